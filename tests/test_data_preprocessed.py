"""The authors' preprocessed format (their data tool's part_rank*.parquet and bucket_index.csv),
written here independently with their column names, read and trained on without re-encoding."""

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import TINY_MODEL

from dina_lrm.config import DiNaConfig
from dina_lrm.data.loader import pair_loader
from dina_lrm.data.preprocessed import PreprocessedPairDataset
from dina_lrm.train.trainer import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_release_parts(directory, pairs_per_rank=(7, 5), shapes=((4, 8, 8), (4, 8, 12)), frame_axis=False, seed=0):
    """Their columns, zstd, small row groups; chosen latents above zero and rejected below."""
    directory.mkdir(parents=True, exist_ok=True)
    rng, written = np.random.default_rng(seed), {}
    for rank, count in enumerate(pairs_per_rank):
        rows = []
        for i in range(count):
            shape = shapes[i % len(shapes)]
            base = rng.normal(size=shape).astype(np.float32) * 0.3
            chosen, rejected = (base + 0.8, base - 0.8)
            if frame_axis:
                chosen, rejected = chosen[:, None], rejected[:, None]
            stored_shape = list(chosen.shape)
            rows.append({"prompt": f"prompt {rank}-{i}", "model1": "a", "model2": "b",
                         "detailed_results": str({"votes_chosen": 3, "votes_rejected": 1, "confidence": 0.75}),
                         "image1_path": f"/data/{rank}_{i}_1.png", "image2_path": f"/data/{rank}_{i}_2.png",
                         "latent1": npy(chosen), "latent2": npy(rejected), "latent1_shape": stored_shape, "latent2_shape": stored_shape})
            written[(rank, i)] = (chosen, rejected)
        pq.write_table(pa.Table.from_pylist(rows), directory / f"part_rank{rank:02d}.parquet", compression="zstd", row_group_size=3)
    return written


def write_bucket_index(path, entries):
    """entries: (rank, row_group, row_index, height, width) in the authors' CSV columns."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["global_id", "parquet_path", "row_group", "row_index", "width", "height", "bucket_id"])
        for gid, (rank, group, row, height, width) in enumerate(entries):
            writer.writerow([gid, f"/their/cluster/path/part_rank{rank:02d}.parquet", group, row, width, height, 0])


def test_items_are_the_written_latents_chosen_first(tmp_path):
    written = write_release_parts(tmp_path / "data")
    dataset = PreprocessedPairDataset(str(tmp_path / "data" / "part_rank*.parquet"))
    assert len(dataset) == 12 and dataset.latent_channels == 4 and dataset.bucket_names == ["64x64", "64x96"]
    for index in range(len(dataset)):
        item = dataset[index]
        rank, i = (0, index) if index < 7 else (1, index - 7)
        assert item["prompt"] == f"prompt {rank}-{i}" and item["confidence"] == 1.0
        np.testing.assert_array_equal(item["chosen"].numpy(), written[(rank, i)][0])
        np.testing.assert_array_equal(item["rejected"].numpy(), written[(rank, i)][1])


def test_the_bucket_index_selects_rows_across_row_groups(tmp_path):
    written = write_release_parts(tmp_path / "data")
    entries = [(0, 0, 2, 64, 64), (0, 2, 0, 64, 64), (1, 1, 1, 64, 96), (0, 1, 1, 64, 96)]  # row 2 of group 0 = row 2; group 2 row 0 = row 6
    write_bucket_index(tmp_path / "bucket_index.csv", entries)
    dataset = PreprocessedPairDataset([str(tmp_path / "data" / "part_rank00.parquet"), str(tmp_path / "data" / "part_rank01.parquet")],
                                      str(tmp_path / "bucket_index.csv"))
    expected = [(0, 2), (0, 6), (1, 4), (0, 4)]
    assert len(dataset) == 4 and sorted(dataset.bucket_names) == ["64x64", "64x96"]
    for index, key in enumerate(expected):
        np.testing.assert_array_equal(dataset[index]["chosen"].numpy(), written[key][0])
    batches = list(pair_loader(str(tmp_path / "data" / "*.parquet"), 2, shuffle=False, bucket_file=str(tmp_path / "bucket_index.csv")))
    assert len(batches) == 2 and all(b["chosen"].shape[0] == 2 for b in batches)


def test_qwen_image_latents_lose_their_frame_axis(tmp_path):
    written = write_release_parts(tmp_path / "data", pairs_per_rank=(3,), shapes=((4, 8, 8),), frame_axis=True)
    item = PreprocessedPairDataset(str(tmp_path / "data" / "part_rank00.parquet"))[1]
    assert item["chosen"].shape == (4, 8, 8)
    np.testing.assert_array_equal(item["chosen"].numpy(), written[(0, 1)][0][:, 0])


def test_training_reads_the_authors_files_directly(tmp_path, pipeline_dir):
    write_release_parts(tmp_path / "data", pairs_per_rank=(16, 16), shapes=((4, 8, 8),))
    entries = [(rank, row // 3, row % 3, 64, 64) for rank in (0, 1) for row in range(16)]
    write_bucket_index(tmp_path / "bucket_index.csv", entries)
    raw = {"model": {**TINY_MODEL, "backbone_model_id": str(pipeline_dir)},
           "training": {"mixed_precision": "fp32", "learning_rate": 2e-3, "max_steps": 16},
           "data": {"train": {"parquet_files": str(tmp_path / "data" / "part_rank*.parquet"), "bucket_file": str(tmp_path / "bucket_index.csv"),
                              "base_batch_size": 4, "max_sequence_length": 16}},
           "paths": {"run_name": "release-data", "save_dir": str(tmp_path / "runs")},
           "logging": {"save_frac": 16, "log_every": 1, "report_to": "none"}, "system": {"seed": 0}}
    config = DiNaConfig.from_dict(raw)
    train(config)
    import json
    losses = [json.loads(line)["train/loss"] for line in (config.paths.run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4])


class TestBadInput:
    def test_an_index_naming_a_file_not_given(self, tmp_path):
        write_release_parts(tmp_path / "data", pairs_per_rank=(3,))
        write_bucket_index(tmp_path / "bucket_index.csv", [(1, 0, 0, 64, 64)])
        with pytest.raises(FileNotFoundError, match="lists part_rank01.parquet, which is not among data.train.parquet_files"):
            PreprocessedPairDataset(str(tmp_path / "data" / "*.parquet"), str(tmp_path / "bucket_index.csv"))

    def test_files_without_the_latent_columns(self, tmp_path):
        (tmp_path / "data").mkdir()
        pq.write_table(pa.table({"prompt": ["x"], "latent1": [b""]}), tmp_path / "data" / "part_rank00.parquet")
        with pytest.raises(ValueError, match=r"lacks the columns \['latent2', 'latent1_shape'\]"):
            PreprocessedPairDataset(str(tmp_path / "data" / "part_rank00.parquet"))

    def test_a_bucket_file_beside_our_shards(self, tmp_path):
        from dina_lrm.data.shards import PairRecord, write_preference_shards

        write_preference_shards(tmp_path / "shards", [PairRecord("p", np.zeros((4, 8, 8), np.float32), np.ones((4, 8, 8), np.float32), pair_id="0", group_id="0")])
        with pytest.raises(ValueError, match="a bucket_file indexes the authors' preprocessed parquet files"):
            pair_loader(str(tmp_path / "shards"), 1, bucket_file="bucket_index.csv")

    def test_a_pickled_npy_is_refused(self, tmp_path):
        (tmp_path / "data").mkdir()
        pickled = io.BytesIO()
        np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        row = {"prompt": ["x"], "latent1": [pickled.getvalue()], "latent2": [pickled.getvalue()], "latent1_shape": [[4, 8, 8]]}
        pq.write_table(pa.table(row), tmp_path / "data" / "part_rank00.parquet")
        with pytest.raises(ValueError, match="allow_pickle=False"):
            PreprocessedPairDataset(str(tmp_path / "data" / "part_rank00.parquet"))
