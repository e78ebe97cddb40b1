"""The authors' preprocessed preference data, read as their data tool writes it.

Their ``prepare_dataset.py`` writes ``part_rank{NN}.parquet`` files whose rows hold ``prompt`` and
``latent1`` (chosen) / ``latent2`` (rejected): the bytes of ``.npy`` float32 arrays, (C, h, w) or
Qwen-Image's (C, 1, h, w), already VAE-normalised. Their ``create_bucket_index.py`` writes
``bucket_index.csv`` (``global_id, parquet_path, row_group, row_index, width, height, bucket_id``),
which selects and buckets the rows (filters, at most N pairs per prompt). Without that index every
row is used, bucketed by its latent size. A user trains on the published SD3.5-M HPDv3 latents by
pointing ``data.train.parquet_files`` (and ``bucket_file``) at them; nothing is re-encoded.
"""

from __future__ import annotations

import csv
import glob
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dina_lrm.data.parquet import RowReader, parquet_file, read_row_group

COLUMNS = ["prompt", "latent1", "latent2", "latent1_shape"]
INDEX_COLUMNS = ["parquet_path", "row_group", "row_index", "width", "height"]


def parquet_paths(parquet_files: str | list[str]) -> list[Path]:
    """The ``.parquet`` files named directly or by glob patterns (empty when none is a parquet file)."""
    patterns = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if any(c in str(pattern) for c in "*?[") else [str(pattern)]
        found += [Path(m) for m in matches if m.endswith(".parquet") and Path(m).is_file()]
    return found


def is_preprocessed(parquet_files: str | list[str]) -> bool:
    """Whether ``parquet_files`` names the authors' parquet files (ours are shard directories)."""
    paths = parquet_paths(parquet_files)
    return bool(paths) and "latent1" in parquet_file(paths[0]).schema_arrow.names


def decode_npy(blob: bytes) -> torch.Tensor:
    """A (C, h, w) float32 latent from ``.npy`` bytes; a singleton frame axis (C, 1, h, w) is dropped."""
    array = np.load(io.BytesIO(blob), allow_pickle=False)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"a preprocessed latent has shape {array.shape}; expected (C, h, w) or (C, 1, h, w)")
    return torch.from_numpy(array.astype(np.float32))


def _index_rows(bucket_file: Path, paths: list[Path]) -> tuple[list[int], list[int], list[str]]:
    """(file, row, bucket) of each row the index lists; files are matched by name, as the authors' loader does."""
    by_name = {path.name: i for i, path in enumerate(paths)}
    reader = RowReader(paths, [], keep=0)
    files, rows, buckets = [], [], []
    with open(bucket_file, newline="") as handle:
        table = csv.DictReader(handle)
        missing = [c for c in INDEX_COLUMNS if c not in (table.fieldnames or [])]
        if missing:
            raise ValueError(f"{bucket_file} is not a bucket index: columns {missing} are missing")
        for line in table:
            name = Path(line["parquet_path"]).name
            if name not in by_name:
                raise FileNotFoundError(f"{bucket_file} lists {name}, which is not among data.train.parquet_files")
            file = by_name[name]
            files.append(file)
            rows.append(int(reader.group_starts[file][int(line["row_group"])]) + int(line["row_index"]))
            buckets.append(f"{line['height']}x{line['width']}")
    return files, rows, buckets


def _scanned_rows(paths: list[Path]) -> tuple[list[int], list[int], list[str]]:
    """(file, row, bucket) of every row, bucketed by latent size (pixels = latent x 8)."""
    files, rows, buckets = [], [], []
    for file, path in enumerate(paths):
        metadata = parquet_file(path).metadata
        shapes = [s for g in range(metadata.num_row_groups) for s in read_row_group(path, g, ["latent1_shape"]).column(0).to_pylist()]
        files += [file] * len(shapes)
        rows += list(range(len(shapes)))
        buckets += [f"{shape[-2] * 8}x{shape[-1] * 8}" for shape in shapes]
    return files, rows, buckets


class PreprocessedPairDataset(Dataset):
    """Map-style view of the authors' parquet files; items as :class:`dina_lrm.data.loader.PairDataset` gives them."""

    has_prompt_embeds = False
    prompt_tokens = None

    def __init__(self, parquet_files: str | list[str], bucket_file: str | None = None, cache_row_groups: int = 2):
        paths = parquet_paths(parquet_files)
        if not paths:
            raise FileNotFoundError(f"no parquet files at {parquet_files}")
        for path in paths:
            absent = [c for c in COLUMNS if c not in parquet_file(path).schema_arrow.names]
            if absent:
                raise ValueError(f"{path} lacks the columns {absent} of the authors' preprocessed format")
        if bucket_file is not None and not Path(bucket_file).is_file():
            raise FileNotFoundError(f"data.train.bucket_file {bucket_file} does not exist")
        files, rows, buckets = _index_rows(Path(bucket_file), paths) if bucket_file else _scanned_rows(paths)
        if not rows:
            raise ValueError(f"no pairs in {bucket_file or parquet_files}")
        self.shard_of, self.row_of = np.array(files), np.array(rows)
        self.bucket_names = sorted(set(buckets))
        lookup = {name: i for i, name in enumerate(self.bucket_names)}
        self.bucket_of = np.array([lookup[b] for b in buckets])
        self.rows = RowReader(paths, COLUMNS, cache_row_groups)
        self.latent_channels = int(self[0]["chosen"].shape[0])

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.row(int(self.shard_of[index]), int(self.row_of[index]))
        chosen, rejected = decode_npy(row["latent1"]), decode_npy(row["latent2"])
        if chosen.shape != rejected.shape:
            raise ValueError(f"pair {index} has latents of shapes {tuple(chosen.shape)} and {tuple(rejected.shape)}")
        return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "confidence": torch.tensor(1.0)}
