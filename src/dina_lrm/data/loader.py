"""Stream preference shards into bucketed batches, split across ranks and workers.

The order of an epoch is a pure function of (seed, epoch): shards in a shuffled order, pairs shuffled
within each shard, and each pair appended to its bucket's buffer; a buffer that holds a *global*
batch (``batch_size * num_replicas`` pairs) is emitted. Rank ``r`` takes slice ``r`` of every global
batch, so N processes with batch B see exactly the pairs one process with batch N*B sees, no pair
twice. DataLoader workers receive whole batches, also without duplicates. Resuming skips the
batches of the epoch already done. Reading shard by shard keeps one row group per worker in memory.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dina_lrm.data.parquet import RowReader, read_table
from dina_lrm.data.preprocessed import PreprocessedPairDataset, is_preprocessed
from dina_lrm.data.shards import INDEX_NAME, decode_latents, read_index

PAIR_COLUMNS = ["prompt", "chosen", "rejected", "latent_shape", "confidence"]
EMBED_COLUMNS = ["prompt_embeds", "prompt_embeds_shape", "pooled_prompt_embeds"]


def shard_directories(parquet_files: str | list[str]) -> list[Path]:
    """Shard directories (with ``index.json``) named directly or by glob patterns."""
    patterns = [parquet_files] if isinstance(parquet_files, str) else list(parquet_files)
    if not any(p for p in patterns):
        raise ValueError("no shard directories given (data.train.parquet_files is empty)")
    directories = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if any(c in str(pattern) for c in "*?[") else [pattern]
        found = [Path(m) for m in matches if (Path(m) / INDEX_NAME).is_file()]
        if not found:
            raise FileNotFoundError(f"no preference shards at {pattern} (expected a directory with {INDEX_NAME} from `dina-lrm prepare`)")
        directories += found
    return directories


class PairDataset(Dataset):
    """Map-style view of one or more shard directories: ``dataset[i]`` is one pair as tensors."""

    def __init__(self, parquet_files: str | list[str], cache_row_groups: int = 2):
        directories = shard_directories(parquet_files)
        indexes = [read_index(d) for d in directories]
        channels = {i["latent_channels"] for i in indexes}
        if len(channels) > 1:
            named = ", ".join(f"{d} ({i['latent_channels']})" for d, i in zip(directories, indexes))
            raise ValueError(f"shard directories mix latent channel counts: {named}; they come from different VAEs")
        embeds = {i["prompt_embeds"] for i in indexes}
        if len(embeds) > 1:
            raise ValueError("some shard directories cache prompt embeddings and some do not; prepare them alike")
        self.latent_channels = channels.pop()
        self.has_prompt_embeds = embeds.pop()
        # T5 tokens of the cached embeddings, as `prepare` recorded them (None: not recorded, or none cached)
        lengths = {i["metadata"].get("max_sequence_length") for i in indexes} if self.has_prompt_embeds else {None}
        if len(lengths) > 1:
            raise ValueError(f"shard directories cache prompt embeddings of different T5 lengths {sorted(map(str, lengths))}")
        self.prompt_tokens = lengths.pop()
        paths, shard_of, row_of, buckets = [], [], [], []
        for directory, index in zip(directories, indexes):
            for shard in index["shards"]:
                if not shard["rows"]:
                    continue
                paths.append(directory / shard["file"])
                shard_of.append(np.full(shard["rows"], len(paths) - 1))
                row_of.append(np.arange(shard["rows"]))
                buckets += read_table(paths[-1], columns=["bucket"]).column("bucket").to_pylist()
        self.shard_of, self.row_of = np.concatenate(shard_of), np.concatenate(row_of)
        self.bucket_names = sorted(set(buckets))
        lookup = {name: i for i, name in enumerate(self.bucket_names)}
        self.bucket_of = np.array([lookup[b] for b in buckets])
        self.rows = RowReader(paths, PAIR_COLUMNS + (EMBED_COLUMNS if self.has_prompt_embeds else []), cache_row_groups)

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.row(int(self.shard_of[index]), int(self.row_of[index]))
        shape = row["latent_shape"]
        item = {
            "prompt": row["prompt"],
            "chosen": decode_latents([row["chosen"]], [shape])[0],
            "rejected": decode_latents([row["rejected"]], [shape])[0],
            "confidence": torch.tensor(row["confidence"], dtype=torch.float32),
        }
        if self.has_prompt_embeds:
            item["prompt_embeds"] = decode_latents([row["prompt_embeds"]], [row["prompt_embeds_shape"]])[0]
            pooled = row["pooled_prompt_embeds"]
            item["pooled_prompt_embeds"] = torch.from_numpy(np.frombuffer(pooled, dtype=np.float16).astype(np.float32))
        return item


def collate_pairs(items: list[dict]) -> dict:
    batch = {"prompts": [item["prompt"] for item in items]}
    for key in ("chosen", "rejected", "confidence", "prompt_embeds", "pooled_prompt_embeds"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


class BucketBatchSampler(Sampler):
    """Per-rank batches of one bucket each; see the module docstring for the order."""

    def __init__(self, dataset: PairDataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.shard_of, self.bucket_of = dataset.shard_of, dataset.bucket_of
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        self._batches: tuple[int, list[np.ndarray]] | None = None
        if not self.global_batches():
            raise ValueError(
                f"{len(self.shard_of)} pairs fill no global batch of {batch_size * num_replicas} "
                f"({batch_size} per process x {num_replicas} processes) within one bucket"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch, and where in it to start (the number of batches already done)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> list[np.ndarray]:
        if self._batches is not None and self._batches[0] == self.epoch:
            return self._batches[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = np.unique(self.shard_of)
        size = self.batch_size * self.num_replicas
        buffers: dict[int, list[int]] = {}
        batches = []
        for shard in rng.permutation(shards) if self.shuffle else shards:
            rows = np.flatnonzero(self.shard_of == shard)
            for pair in rng.permutation(rows) if self.shuffle else rows:
                buffer = buffers.setdefault(int(self.bucket_of[pair]), [])
                buffer.append(int(pair))
                if len(buffer) == size:
                    batches.append(np.array(buffer))
                    buffer.clear()
        if not self.drop_last:
            batches += [np.array(buffer) for _, buffer in sorted(buffers.items()) if buffer]
        self._batches = (self.epoch, batches)
        return batches

    def _mine(self) -> list[list[int]]:
        """This rank's slices; with ``drop_last=False`` a short final batch may leave a rank nothing."""
        slices = [b[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist() for b in self.global_batches()]
        return [s for s in slices[self.start_batch :] if s]

    def __iter__(self):
        yield from self._mine()

    def __len__(self) -> int:
        return len(self._mine())


def pair_loader(
    parquet_files: str | list[str], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
    shuffle: bool = True, num_workers: int = 0, drop_last: bool = True, bucket_file: str | None = None,
) -> DataLoader:
    """A DataLoader of bucketed pair batches; ``loader.batch_sampler.set_epoch(e, start)`` before each epoch.
    ``drop_last=False`` (evaluation) also yields each bucket's short final batch. ``parquet_files``: our
    shard directories, or the authors' preprocessed parquet files (with their ``bucket_file`` index)."""
    if is_preprocessed(parquet_files):
        dataset = PreprocessedPairDataset(parquet_files, bucket_file)
    elif bucket_file:
        raise ValueError("a bucket_file indexes the authors' preprocessed parquet files; our shard directories carry their buckets")
    else:
        dataset = PairDataset(parquet_files)
    sampler = BucketBatchSampler(dataset, batch_size, num_replicas, rank, seed, shuffle, drop_last)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
