"""The released on-disk layout.

    DIR/config.json                              the training configuration (release YAML as JSON)
    DIR/checkpoint/rm_head.safetensors           reward head (what we read first)
    DIR/checkpoint/rm_head.pt                    the same state dict as a torch file, for the authors' own inference
                                                 code (the release ships only this one; we read it with weights_only)
    DIR/checkpoint/backbone_lora/                PEFT adapter, when the backbone is LoRA-tuned
    DIR/checkpoint/backbone.safetensors          backbone weights, when the backbone is fully tuned
                                                 (the release's full_model.pt is read too)
    DIR/manifest.json                            size and SHA-256 of every file above (ours; the release has
                                                 none), verified at load when present

Every tensor read is checked finite, so a damaged file is named at load instead of scoring NaN.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
HEAD_NAME = "rm_head.safetensors"
RELEASE_HEAD_NAME = "rm_head.pt"
LORA_DIR = "backbone_lora"
BACKBONE_NAME = "backbone.safetensors"
RELEASE_FULL_NAME = "full_model.pt"
MANIFEST_NAME = "manifest.json"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def resolve_directory(directory_or_hub_id: str | Path) -> Path:
    """A local reward model directory as it is; a hub id (``owner/name``, not a local directory) as
    its local snapshot, downloaded or, offline, read from the Hugging Face cache."""
    path = Path(directory_or_hub_id)
    if path.is_dir():
        return path
    repo = str(directory_or_hub_id)
    if not HUB_ID.match(repo):
        raise FileNotFoundError(f"reward model directory not found: {path}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo))
    except GatedRepoError as err:
        raise OSError(f"{repo} is gated on the hub: accept its licence at https://huggingface.co/{repo} and log in "
                      "(`hf auth login` or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"reward model directory not found: {repo} is neither a local directory nor a hub "
                                "repository (a private one needs a login)") from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(f"reward model directory not found: {repo} is not a local directory, and as a hub id it is "
                                f"not in the cache ({constants.HF_HUB_CACHE}) while the hub is offline or unreachable") from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or not safetensors ({err})") from err
    check_finite(state, path)
    return state


def check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a state dict with a NaN or inf weight, naming the tensor and the file."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} is damaged: tensor {key!r} holds NaN or inf")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle with ``weights_only=True`` (no code runs)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or unsafe pickle
        raise CheckpointError(f"cannot read {path}: corrupt, or not a plain tensor state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    check_finite(state, path)
    return state


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, files: list[Path] | None = None) -> None:
    """Record the size and SHA-256 of ``files`` (default: every file under ``directory`` but manifests);
    call it after everything else is written. It is written to a temporary name and renamed, so a
    directory whose writing was interrupted has no manifest."""
    if files is None:
        files = [p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(files)}
    partial = directory / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps({"files": entries}, indent=1))
    partial.rename(directory / MANIFEST_NAME)


def open_directory(directory_or_hub_id: str | Path, checksums: bool = True) -> Path:
    """The reward model directory (see :func:`resolve_directory`), refused unless it has its config and,
    when it carries a manifest, every file listed there (with its SHA-256 unless ``checksums`` is False:
    the cheap check a caller runs before it loads a generator)."""
    directory = resolve_directory(directory_or_hub_id)
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory / CONFIG_NAME} is missing: not a DiNa-LRM checkpoint directory")
    if (directory / MANIFEST_NAME).is_file():
        verify_manifest(directory, checksums)
    return directory


def verify_manifest(directory: Path, checksums: bool = True) -> None:
    """Raise :class:`CheckpointError`, naming the file, unless every file matches ``directory``'s manifest
    (its size, and its SHA-256 unless ``checksums`` is False)."""
    manifest = directory / MANIFEST_NAME
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest} is damaged: {err}") from None
    for relative, expected in entries.items():
        path = directory / relative
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_NAME})")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path} is damaged: {path.stat().st_size} bytes, {MANIFEST_NAME} says {expected['bytes']}")
        if checksums and sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from {MANIFEST_NAME}")


def find_file(folder: Path, *names: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"none of {list(names)} found in {folder}")


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, prefix: str = "") -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped key."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{what} does not fit this model: {'; '.join(parts)}. Was it trained for another backbone, "
            "layer count or tap list?"
        )
    module.load_state_dict(state)


def write_config(directory: Path, config: dict) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def write_weights(path: Path, module: nn.Module) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def write_release_head(path: Path, module: nn.Module) -> None:
    """The head as the release's ``rm_head.pt``: a plain state dict of tensors (loadable with
    ``torch.load(..., weights_only=True)``), which the authors' inference code reads."""
    torch.save({k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}, path)
