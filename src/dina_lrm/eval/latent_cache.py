"""A benchmark's images encoded once into latents, so repeated evaluations never re-encode.

The cache is a folder of parquet shards, one row per image (``group_id``, ``image_index``,
``image_id``, float16 ``latent`` bytes, ``latent_shape``), plus ``cache.json`` with a fingerprint of
the benchmark (its groups and images), the generator and the bucketing. Images are encoded exactly
as ``dina-lrm prepare`` encodes training data (same buckets, same VAE normalisation). Shards are
written atomically and spread over ranks like ``prepare``'s, so an interrupted encode resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from tqdm import tqdm

from dina_lrm.data.parquet import read_table
from dina_lrm.data.prepare import LatentEncoder, PrepareConfig, pending_units, shard_path
from dina_lrm.data.readers import WorkUnit
from dina_lrm.data.records import PreferenceGroup, ReadReport

CACHE_FILE = "cache.json"
SCHEMA = pa.schema([
    ("group_id", pa.string()),
    ("image_index", pa.int32()),
    ("image_id", pa.string()),
    ("latent", pa.binary()),
    ("latent_shape", pa.list_(pa.int32())),
])


def fingerprint(groups: list[PreferenceGroup], config: PrepareConfig) -> str:
    content = {
        "groups": [[g.group_id, g.image_ids] for g in groups],
        "encoder": {k: v for k, v in asdict(config).items() if k in ("model", "reference_size", "bucket_step", "dtype")},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _check_or_claim(directory: Path, key: str, state: PartialState) -> None:
    marker = directory / CACHE_FILE
    if marker.is_file():
        found = json.loads(marker.read_text()).get("fingerprint")
        if found != key:
            raise ValueError(
                f"the latent cache at {directory} was built for another benchmark, image set or generator "
                f"(fingerprint {found}, need {key}); delete it or pass another --latent-cache"
            )
    elif state.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": key}))
    state.wait_for_everyone()


def _write(path: Path, encoded: list[tuple[PreferenceGroup, list[np.ndarray]]]) -> None:
    rows = [
        {"group_id": group.group_id, "image_index": i, "image_id": group.image_ids[i],
         "latent": np.ascontiguousarray(latent, dtype=np.float16).tobytes(), "latent_shape": list(latent.shape)}
        for group, latents in encoded
        for i, latent in enumerate(latents)
    ]
    temporary = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), temporary)
    os.replace(temporary, path)


def _readable(path: Path) -> bool:
    try:
        return path.is_file() and pq.read_schema(path) is not None
    except (OSError, pa.ArrowInvalid):
        return False


def build_latent_cache(groups: list[PreferenceGroup], directory: str | Path, config: PrepareConfig, pipe_loader) -> None:
    """Encode the images of ``groups`` that are not cached yet (this rank's share of shards).
    ``pipe_loader()`` returns the generator pipeline; it is only called when there is work."""
    state = PartialState()
    directory = Path(directory)
    _check_or_claim(directory, fingerprint(groups, config), state)
    chunk = config.groups_per_shard
    units = [
        WorkUnit(n, f"groups {start}..", lambda start=start: (groups[start : start + chunk], ReadReport()))
        for n, start in enumerate(range(0, len(groups), chunk))
    ]
    todo = pending_units(units, directory, state, finished=_readable)
    if todo:
        encoder = LatentEncoder(pipe_loader(), config)
        for unit in tqdm(todo, desc=f"encode images [rank {state.process_index}]", disable=not state.is_local_main_process):
            unit_groups, report = unit.read()
            _write(shard_path(directory, unit), encoder.encode_groups(unit_groups, report))
    state.wait_for_everyone()


def load_latent_cache(directory: str | Path) -> dict[tuple[str, int], tuple[bytes, list[int]]]:
    """``(group_id, image_index) -> (float16 bytes, shape)`` for every cached image; decode with
    :func:`decode_latent`."""
    entries = {}
    for path in sorted(Path(directory).glob("shard-*.parquet")):
        table = read_table(path, columns=["group_id", "image_index", "latent", "latent_shape"])
        for group_id, index, blob, shape in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            entries[(group_id, index)] = (blob, shape)
    return entries


def decode_latent(entry: tuple[bytes, list[int]]) -> torch.Tensor:
    blob, shape = entry
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float16).reshape(shape).astype(np.float32))
