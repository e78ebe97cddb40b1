import numpy as np
import pytest
import torch

from dina_lrm.data.loader import BucketBatchSampler, PairDataset, pair_loader
from dina_lrm.data.shards import PairRecord, write_preference_shards


def write_pairs(directory, count, channels=4, sizes=((8, 8), (4, 16)), rows_per_shard=7, seed=0):
    """Pairs whose latents encode their own number, so a test can tell which pair it got."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        h, w = sizes[int(rng.integers(len(sizes)))]
        records.append(PairRecord(f"prompt {i}", np.full((channels, h, w), i, np.float32), np.full((channels, h, w), -i, np.float32),
                                  pair_id=str(i), group_id=str(i // 2), confidence=0.5 + (i % 2) / 2))
    write_preference_shards(directory, records, rows_per_shard=rows_per_shard)
    return directory


def epoch_pairs(loader_batches):
    return [int(pair[0, 0, 0]) for batch in loader_batches for pair in batch["chosen"]]


def test_pairs_read_back_exactly(tmp_path):
    dataset = PairDataset(str(write_pairs(tmp_path / "s", 30)))
    assert len(dataset) == 30 and set(dataset.bucket_names) == {"8x8", "4x16"}
    item = dataset[17]
    assert item["prompt"] == "prompt 17" and item["chosen"].eq(17).all() and item["rejected"].eq(-17).all()
    assert item["confidence"].item() == 1.0 and dataset[16]["confidence"].item() == 0.5


def test_batches_hold_one_bucket_and_cover_the_epoch_once(tmp_path):
    loader = pair_loader(str(write_pairs(tmp_path / "s", 60)), batch_size=4, seed=3)
    batches = list(loader)
    assert all(len({tuple(p.shape) for p in b["chosen"]}) == 1 and len(b["prompts"]) == 4 for b in batches)
    seen = epoch_pairs(batches)
    assert len(seen) == len(set(seen)) and len(seen) >= 60 - 2 * 3  # at most batch-1 left over per bucket
    assert [b["prompts"] for b in pair_loader(str(tmp_path / "s"), batch_size=4, seed=3)] == [b["prompts"] for b in batches]
    loader.batch_sampler.set_epoch(1)
    second = epoch_pairs(loader)
    assert second != seen and len(second) == len(set(second)) >= 60 - 2 * 3


def test_ranks_split_each_global_batch_like_one_process_with_the_doubled_batch(tmp_path):
    directory = str(write_pairs(tmp_path / "s", 80))
    single = [b["prompts"] for b in pair_loader(directory, batch_size=6, seed=1)]
    ranks = [[b["prompts"] for b in pair_loader(directory, batch_size=3, num_replicas=2, rank=r, seed=1)] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    assert [a + b for a, b in zip(*ranks)] == single
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))


def test_workers_and_resume_give_the_same_batches(tmp_path):
    directory = str(write_pairs(tmp_path / "s", 60))
    reference = [b["prompts"] for b in pair_loader(directory, batch_size=4, seed=0)]
    workers = [b["prompts"] for b in pair_loader(directory, batch_size=4, seed=0, num_workers=2)]
    assert workers == reference
    loader = pair_loader(directory, batch_size=4, seed=0)
    loader.batch_sampler.set_epoch(0, start_batch=5)
    assert len(loader) == len(reference) - 5 and [b["prompts"] for b in loader] == reference[5:]


def test_bad_shard_sets_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preference shards at"):
        PairDataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="empty"):
        PairDataset("")
    write_pairs(tmp_path / "four", 10)
    write_pairs(tmp_path / "sixteen", 10, channels=16)
    with pytest.raises(ValueError, match="mix latent channel counts"):
        PairDataset([str(tmp_path / "four"), str(tmp_path / "sixteen")])
    dataset = PairDataset(str(tmp_path / "four"))
    with pytest.raises(ValueError, match="fill no global batch of 64"):
        BucketBatchSampler(dataset, batch_size=32, num_replicas=2)


def test_glob_patterns_name_several_shard_directories(tmp_path):
    write_pairs(tmp_path / "part-a", 10)
    write_pairs(tmp_path / "part-b", 12)
    assert len(PairDataset(str(tmp_path / "part-*"))) == 22
    assert torch.is_tensor(PairDataset([str(tmp_path / "part-a")])[0]["chosen"])


def test_evaluation_loading_keeps_every_pair_across_ranks(tmp_path):
    directory = str(write_pairs(tmp_path / "s", 37))
    seen = [p for r in (0, 1) for p in epoch_pairs(pair_loader(directory, 4, num_replicas=2, rank=r, shuffle=False, drop_last=False))]
    assert sorted(seen) == list(range(37))
