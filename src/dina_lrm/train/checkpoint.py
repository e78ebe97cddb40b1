"""Training checkpoints that hold data only, for ``train`` and ``align``.

Both trainers (``train``, ``align``) lay checkpoints out alike: ``<run>/checkpoints/step-NNNNNNN/``,
written as ``step-NNNNNNN.partial/`` and renamed when complete (:func:`begin_checkpoint`,
:func:`commit_checkpoint`), so an interrupted write never looks like a checkpoint.

A state (an optimizer's, a scheduler's, the RNGs', any nest of dicts, lists and tuples) is written as
two files we read back ourselves: ``NAME.safetensors`` with its tensors and ``NAME.json`` with the
rest, tensors replaced by their keys. Nothing is ever unpickled: a checkpoint with a pickle file at
its top (an older accelerate-format checkpoint, or a planted one) is refused. ``manifest.json``,
written last, lists every file with its size and SHA-256; a checkpoint is read only after every file
verifies, so a damaged or missing file is named before any reader touches it, and a checkpoint whose
writing was interrupted has no manifest.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dina_lrm.models.checkpoint import MANIFEST_NAME, CheckpointError, verify_manifest, write_manifest

__all__ = ["CheckpointError", "begin_checkpoint", "checkpoint_path", "commit_checkpoint", "latest_checkpoint", "list_checkpoints",
           "load_state", "newest_verified", "save_state", "verify"]

PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
CHECKPOINT_PREFIX = "step-"
PARTIAL_SUFFIX = ".partial"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (unfinished ``.partial`` writes left out)."""
    return sorted((run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*[0-9]"))


def begin_checkpoint(directory: Path) -> Path:
    """A fresh folder to write ``directory``'s files into (call on the main process only)."""
    partial = directory.with_name(directory.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def commit_checkpoint(partial: Path) -> Path:
    """Seal a :func:`begin_checkpoint` folder: the manifest last, then the rename that makes it a checkpoint."""
    directory = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
    write_manifest(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def latest_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and a line for each newer one skipped."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
    return newest_verified(found)


def save_state(state, directory: Path, name: str) -> None:
    """Write ``state`` as ``name.safetensors`` (its tensors) and ``name.json`` (everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, name, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure, allow_nan=False))


def load_state(directory: Path, name: str):
    """The state :func:`save_state` wrote (tuples come back as tuples, integer keys as integers)."""
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def _encode(value, path: str, tensors: dict):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
        return {"__ndarray__": path, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"__dict__": [[key, _encode(item, f"{path}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "__tuple__" if isinstance(value, tuple) else "__list__"
        return {kind: [_encode(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} (at {path}) in a data-only checkpoint")


def _decode(value, tensors: dict):
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__dict__" in value:
        return {key: _decode(item, tensors) for key, item in value["__dict__"]}
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__list__" in value:
        return [_decode(item, tensors) for item in value["__list__"]]
    return float(value["__float__"])


def rng_states() -> dict:
    """This process's random generators: Python's, NumPy's, torch's CPU and CUDA ones."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def verify(directory: Path) -> None:
    """Raise :class:`CheckpointError`, naming the file, unless every file matches the manifest."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory / pickles[0]} is a pickle file: dina-lrm checkpoints hold safetensors and JSON "
                              "only and are never unpickled (an accelerate-format or tampered checkpoint)")
    if not (directory / MANIFEST_NAME).is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST_NAME}: its writing did not finish, or it is not a dina-lrm checkpoint")
    verify_manifest(directory)


def newest_verified(candidates: list[Path]) -> tuple[Path, list[str]]:
    """The newest checkpoint that verifies, and one line for each newer one skipped (why)."""
    skipped = []
    for candidate in sorted(candidates, reverse=True):
        try:
            verify(candidate)
        except CheckpointError as err:
            skipped.append(f"skipped {candidate.name}: {err}")
            continue
        return candidate, skipped
    where = candidates[0].parent if candidates else "the run directory"
    raise FileNotFoundError(f"--resume latest: no checkpoint under {where} verifies" + "".join(f"\n  {line}" for line in skipped))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the log rows after ``step``: a resumed run logs those steps again."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(row + "\n" for row in rows))
