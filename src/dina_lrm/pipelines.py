"""Loading a generator's diffusers pipeline, for every command that needs one (prepare, train, eval,
score, serve, align, search)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from dina_lrm.config import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def load_pipeline(model_id_or_dir: str | Path, dtype: torch.dtype = torch.float32, skip: list[str] | tuple = ()):
    """A diffusers pipeline from a local directory or a hub id, with a clear error if neither loads.

    Components a local pipeline saved as absent (SD3 without T5: ``text_encoder_3: [null, null]``)
    are passed as None, which diffusers requires for non-optional components; so are the ``skip``
    components (e.g. the text encoders when prompt embeddings are cached)."""
    absent = {name: None for name in skip}
    index = Path(model_id_or_dir) / "model_index.json"
    if index.is_file():
        components = json.loads(index.read_text())
        absent = {name: None for name in skip if name in components}  # a FLUX pipeline has no text_encoder_3
        absent.update({name: None for name, value in components.items() if value == [None, None]})
    try:
        return DiffusionPipeline.from_pretrained(str(model_id_or_dir), dtype=dtype, **absent)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(model_id_or_dir).exists() else "hub id (or missing local path)"
        gated = "gated" in str(err).lower() or "401" in str(err)
        hint = (f"; the model is gated: accept its licence at https://huggingface.co/{model_id_or_dir} and log in "
                "(`hf auth login` or HF_TOKEN)") if gated else ""
        raise OSError(f"cannot load the generator pipeline from {model_id_or_dir!r} ({where}): {err}{hint}") from err
