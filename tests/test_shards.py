import json

import numpy as np
import pytest

from dina_lrm.data.shards import PairRecord, load_preference_shards, read_index, write_preference_shards


def records(count, channels=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        PairRecord(
            prompt=f"prompt {i % 3}",
            chosen=rng.normal(size=(channels, size, size)).astype(np.float32),
            rejected=rng.normal(size=(channels, size, size)).astype(np.float32),
            pair_id=f"p{i}",
            group_id=f"g{i % 3}",
            confidence=0.75 if i % 2 else 1.0,
            source="generated" if i % 2 else "colour",
        )
        for i in range(count)
    ]


def test_shards_round_trip(tmp_path):
    written = records(5)
    index_path = write_preference_shards(tmp_path, written, rows_per_shard=2, metadata={"split": "train"})
    index = json.loads(index_path.read_text())
    assert [s["rows"] for s in index["shards"]] == [2, 2, 1]
    assert index["num_pairs"] == 5 and index["latent_channels"] == 4 and index["metadata"] == {"split": "train"}
    table = load_preference_shards(tmp_path)
    assert len(table) == 5 and table.prompts == [r.prompt for r in written]
    assert table.chosen.shape == (5, 4, 8, 8)
    expected = np.stack([r.chosen for r in written]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(table.chosen.numpy(), expected)
    np.testing.assert_allclose(table.rejected.numpy(), np.stack([r.rejected for r in written]), atol=2e-3)
    assert table.confidence.tolist() == [1.0, 0.75, 1.0, 0.75, 1.0]
    assert table.sources[:2] == ["colour", "generated"] and table.group_ids[:2] == ["g0", "g1"]


def test_bad_shard_input_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        load_preference_shards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no pairs"):
        write_preference_shards(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="mix latent channel"):
        write_preference_shards(tmp_path / "mixed", records(1, channels=4) + records(1, channels=16))
    bad = records(1)
    bad[0].chosen[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_preference_shards(tmp_path / "nan", bad)
    bad = records(1)
    bad[0].rejected = bad[0].rejected[:, :4]
    with pytest.raises(ValueError, match="one \\(C, H, W\\) shape"):
        write_preference_shards(tmp_path / "shape", bad)
    write_preference_shards(tmp_path / "gone", records(3), rows_per_shard=2)
    (tmp_path / "gone" / "shard-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.parquet"):
        read_index(tmp_path / "gone")
