"""Preference shards: parquet files of latent pairs plus an ``index.json``.

One row per pair: ``pair_id``, ``group_id`` (pairs from one prompt group share it), ``prompt``,
``chosen`` / ``rejected`` (normalised latents as float16 bytes), ``chosen_id`` / ``rejected_id``
(image names), ``latent_shape`` ([C, H, W], shared by both sides), ``bucket`` ("HxW" of the latent),
``confidence`` (P(chosen preferred); 1 for a hard label), ``source``, and, when prompt embeddings
are cached, ``prompt_embeds`` / ``pooled_prompt_embeds`` (float16 bytes) with their shapes.

Each shard is written atomically (a temporary file renamed into place) and carries its own
metadata (latent channels, pairs per bucket, the reader's report), so an interrupted job can be
resumed by skipping finished shards, and ``index.json`` can be rebuilt from the shards alone.
Training code reads only this format, whatever the data came from.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dina_lrm.data.parquet import naming_the_file, read_table
from dina_lrm.data.records import ReadReport

FORMAT = "dina-lrm/preference-shards"
VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-*.parquet"
METADATA_KEY = b"dina_lrm"
ROW_GROUP_BYTES = 64 << 20  # a loader decodes one row group at a time: keep it near 64 MiB
SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("group_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.binary()),
    ("rejected", pa.binary()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("latent_shape", pa.list_(pa.int32())),
    ("bucket", pa.string()),
    ("confidence", pa.float32()),
    ("source", pa.string()),
    ("prompt_embeds", pa.binary()),
    ("prompt_embeds_shape", pa.list_(pa.int32())),
    ("pooled_prompt_embeds", pa.binary()),
])


@dataclass
class PairRecord:
    prompt: str
    chosen: np.ndarray  # (C, H, W) normalised latent
    rejected: np.ndarray
    pair_id: str
    group_id: str
    confidence: float = 1.0
    source: str = ""
    chosen_id: str = ""
    rejected_id: str = ""
    prompt_embeds: np.ndarray | None = None  # (L, D) encoder hidden states of the prompt
    pooled_prompt_embeds: np.ndarray | None = None  # (P,)


@dataclass
class PairTable:
    """All pairs of a shard set in memory (latents as float32 tensors)."""

    prompts: list[str]
    chosen: torch.Tensor  # (N, C, H, W)
    rejected: torch.Tensor
    confidence: torch.Tensor  # (N,)
    sources: list[str]
    group_ids: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def _fp16_bytes(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float16).tobytes()


def _row(record: PairRecord) -> dict:
    chosen, rejected = np.asarray(record.chosen), np.asarray(record.rejected)
    if chosen.shape != rejected.shape or chosen.ndim != 3:
        raise ValueError(f"pair {record.pair_id}: chosen {chosen.shape} and rejected {rejected.shape} must be one (C, H, W) shape")
    if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
        raise ValueError(f"pair {record.pair_id}: latents contain NaN or inf")
    if np.abs(chosen).max() > 65504 or np.abs(rejected).max() > 65504:
        raise ValueError(f"pair {record.pair_id}: latents exceed the float16 range; are they normalised?")
    embeds = record.prompt_embeds
    return {
        "pair_id": record.pair_id,
        "group_id": record.group_id,
        "prompt": record.prompt,
        "chosen": _fp16_bytes(chosen),
        "rejected": _fp16_bytes(rejected),
        "chosen_id": record.chosen_id,
        "rejected_id": record.rejected_id,
        "latent_shape": list(chosen.shape),
        "bucket": f"{chosen.shape[1]}x{chosen.shape[2]}",
        "confidence": float(record.confidence),
        "source": record.source,
        "prompt_embeds": _fp16_bytes(embeds),
        "prompt_embeds_shape": list(embeds.shape) if embeds is not None else None,
        "pooled_prompt_embeds": _fp16_bytes(record.pooled_prompt_embeds),
    }


def write_shard(path: str | Path, records: Iterable[PairRecord], report: ReadReport | None = None) -> dict:
    """Write one shard atomically; returns its metadata (rows, latent channels, pairs per bucket)."""
    path = Path(path)
    rows = [_row(r) for r in records]
    channels = sorted({row["latent_shape"][0] for row in rows})
    if len(channels) > 1:
        raise ValueError(f"pairs mix latent channel counts {channels}")
    embeds = {row["prompt_embeds"] is not None for row in rows}
    if len(embeds) > 1:
        raise ValueError("some pairs carry prompt embeddings and some do not")
    meta = {
        "rows": len(rows),
        "latent_channels": channels[0] if channels else None,
        "buckets": dict(sorted(Counter(row["bucket"] for row in rows).items())),
        "prompt_embeds": embeds == {True},
        "report": (report or ReadReport()).to_dict(),
    }
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    row_bytes = max(1, table.nbytes // max(1, len(rows)))
    temporary = path.with_name(path.name + ".tmp")
    pq.write_table(table, temporary, row_group_size=int(np.clip(ROW_GROUP_BYTES // row_bytes, 1, 1024)))
    os.replace(temporary, path)
    return meta


def shard_metadata(path: Path) -> dict:
    with naming_the_file(path):
        raw = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in raw:
        raise ValueError(f"{path} is not a dina-lrm preference shard (no {METADATA_KEY.decode()} metadata)")
    return json.loads(raw[METADATA_KEY])


def write_index(directory: str | Path, metadata: dict | None = None) -> Path:
    """Build ``index.json`` from the shards in ``directory``."""
    directory = Path(directory)
    shards, report, buckets, channels, embeds = [], ReadReport(), Counter(), set(), set()
    for path in sorted(directory.glob(SHARD_PATTERN)):
        meta = shard_metadata(path)
        shards.append({"file": path.name, "rows": meta["rows"], "buckets": meta["buckets"]})
        report.merge(ReadReport.from_dict(meta["report"]))
        buckets.update(meta["buckets"])
        if meta["rows"]:
            channels.add(meta["latent_channels"])
            embeds.add(meta["prompt_embeds"])
    if not sum(buckets.values()):
        raise ValueError(f"no pairs in {directory}: {report.summary()}")
    if len(channels) > 1:
        raise ValueError(f"shards in {directory} mix latent channel counts {sorted(channels)}")
    if len(embeds) > 1:
        raise ValueError(f"some shards in {directory} carry prompt embeddings and some do not")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "latent_channels": channels.pop(),
        "num_pairs": sum(buckets.values()),
        "buckets": dict(sorted(buckets.items())),
        "prompt_embeds": embeds.pop(),
        "report": report.to_dict(),
        "shards": shards,
        "metadata": metadata or {},
    }
    path = directory / INDEX_NAME
    path.write_text(json.dumps(index, indent=2))
    return path


def write_preference_shards(
    directory: str | Path, records: Iterable[PairRecord], rows_per_shard: int = 4096, metadata: dict | None = None
) -> Path:
    """Write in-memory ``records`` as ``shard-NNNNN.parquet`` files and ``index.json``; returns the index path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = list(records)
    if not records:
        raise ValueError("no pairs to write")
    for number, start in enumerate(range(0, len(records), rows_per_shard)):
        chunk = records[start : start + rows_per_shard]
        write_shard(directory / f"shard-{number:05d}.parquet", chunk, ReadReport(rows=len(chunk), pairs=len(chunk)))
    return write_index(directory, metadata)


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no preference shards at {directory}: {INDEX_NAME} is missing")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"{path} has format version {index.get('version')}; this dina-lrm reads version {VERSION}")
    if not index["shards"] or index["num_pairs"] == 0:
        raise ValueError(f"{path} lists no pairs")
    for shard in index["shards"]:
        if not (Path(directory) / shard["file"]).is_file():
            raise FileNotFoundError(f"shard {shard['file']} listed in {path} is missing")
    return index


def decode_latents(blobs: list[bytes], shapes: list[list[int]]) -> torch.Tensor:
    """float16 bytes of equally shaped latents -> (N, C, H, W) float32."""
    if len({tuple(s) for s in shapes}) > 1:
        raise ValueError("pairs of several latent shapes: load one bucket at a time")
    arrays = [np.frombuffer(blob, dtype=np.float16).reshape(shape) for blob, shape in zip(blobs, shapes)]
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


def load_preference_shards(directory: str | Path) -> PairTable:
    """Read every shard listed in the index into one ``PairTable`` (all pairs must share one bucket)."""
    index = read_index(directory)
    columns = ["prompt", "chosen", "rejected", "latent_shape", "confidence", "source", "group_id"]
    table = pa.concat_tables(read_table(Path(directory) / s["file"], columns=columns) for s in index["shards"])
    shapes = table.column("latent_shape").to_pylist()
    return PairTable(
        prompts=table.column("prompt").to_pylist(),
        chosen=decode_latents(table.column("chosen").to_pylist(), shapes),
        rejected=decode_latents(table.column("rejected").to_pylist(), shapes),
        confidence=torch.tensor(table.column("confidence").to_pylist(), dtype=torch.float32),
        sources=table.column("source").to_pylist(),
        group_ids=table.column("group_id").to_pylist(),
    )
