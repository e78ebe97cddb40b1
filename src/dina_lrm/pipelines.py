"""Loading a generator's diffusers pipeline, for every command that needs one (prepare, train, eval,
score, serve, align, search)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from safetensors import safe_open
from torch import nn

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


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def load_kept_transformer(model_id_or_dir: str | Path, keep: Callable[[nn.Module], nn.Module],
                          dtype: torch.dtype = torch.float32) -> nn.Module:
    """The generator's transformer holding only the modules ``keep(transformer)`` returns (a reward's
    backbone): built without weights (on the meta device), then only those modules' tensors are read
    from the safetensors files, one at a time, in ``dtype``. The other modules (later blocks, the output
    norm and projection) are removed, so they never occupy memory and the module moves like any other.
    Loaded weights equal a whole-pipeline load's; a checkpoint without safetensors loads whole."""
    directory = transformer_directory(model_id_or_dir)
    transformer_class = getattr(diffusers, json.loads((directory / "config.json").read_text())["_class_name"])
    files = _weight_files(directory)
    if not files:
        return transformer_class.from_pretrained(str(directory), torch_dtype=dtype)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (e.g. SD3's position table) computed as usual
        transformer = transformer_class.from_config(transformer_class.load_config(str(directory)))
    kept = {id(tensor) for tensor in keep(transformer).parameters()}
    names = [name for name, parameter in transformer.named_parameters() if id(parameter) in kept]
    transformer.load_state_dict(_read_tensors(files, names, dtype), strict=False, assign=True)
    _drop_unloaded(transformer)
    for module in transformer.modules():  # as from_pretrained(torch_dtype=...) casts them
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module.register_buffer(name, buffer.to(dtype), persistent=name not in module._non_persistent_buffers_set)
    return transformer.eval()


def transformer_directory(model_id_or_dir: str | Path) -> Path:
    """The local ``transformer/`` folder of a pipeline directory or hub id (only that folder is fetched)."""
    local = Path(model_id_or_dir) / "transformer"
    if local.is_dir():
        return local
    if Path(model_id_or_dir).exists():
        raise FileNotFoundError(f"{model_id_or_dir} has no transformer/ folder: not a diffusers pipeline directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_id_or_dir), allow_patterns=["transformer/*"])) / "transformer"
    except Exception as err:  # offline, gated, unknown id: the same one-line error as load_pipeline's
        raise OSError(f"cannot load the generator's transformer from {model_id_or_dir!r} (hub id or missing local path): {err}") from err


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file ({} when the transformer has no safetensors weights)."""
    if (directory / WEIGHTS_INDEX_NAME).is_file():
        weight_map = json.loads((directory / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / WEIGHTS_NAME).is_file():
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
            return {name: directory / WEIGHTS_NAME for name in handle.keys()}
    return {}


def _read_tensors(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    missing = [name for name in names if name not in files]
    if missing:
        raise ValueError(f"the transformer's weights lack {len(missing)} tensors the reward needs, e.g. {missing[:3]}")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    state = {}
    for path, part in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in part:
                state[name] = handle.get_tensor(name).to(dtype)
    return state


def _drop_unloaded(module: nn.Module) -> None:
    """Remove every submodule that holds only meta (never loaded) tensors; trailing blocks of a list
    go, so the kept blocks keep their indices."""
    for name, child in reversed(list(module.named_children())):
        tensors = list(child.parameters()) + list(child.buffers())
        if tensors and all(t.is_meta for t in tensors):
            if isinstance(module, nn.ModuleList):
                del module[int(name)]
            elif isinstance(module, nn.ModuleDict):
                del module[name]
            else:
                setattr(module, name, None)
        else:
            _drop_unloaded(child)
