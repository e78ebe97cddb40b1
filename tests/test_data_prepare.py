import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dina_lrm.data.buckets import aspect_ratio_buckets, nearest_bucket, resize_to_bucket
from dina_lrm.data.images import vae_encode
from dina_lrm.data.prepare import PrepareConfig, prepare
from dina_lrm.data.readers import LabelRules, dataset_units, read_dataset
from dina_lrm.data.shards import read_index
from dina_lrm.models.sd3_text import SD3PromptEncoder


def block_image(size=(64, 64), seed=0) -> Image.Image:
    """(width, height) random-colour blocks, so every image encodes differently."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(8, 0).repeat(8, 1))


def save_image(path, size=(64, 64), seed=0):
    block_image(size, seed).save(path)
    return path


def png_bytes(seed):
    buffer = io.BytesIO()
    block_image(seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def generic_jsonl(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"img{i}.png", size=(64, 64) if i < 4 else (128, 48), seed=i)
    rows = [
        {"prompt": "a red circle", "chosen": "img0.png", "rejected": "img1.png", "confidence": 0.8},
        {"prompt": "two blue squares", "images": ["img2.png", "img3.png", "img0.png"], "ranks": [2, 1, 2]},
        {"prompt": "a wide scene", "chosen": "img4.png", "rejected": "img5.png"},
        {"prompt": "broken", "chosen": "img0.png", "rejected": "missing.png"},
        {"prompt": "", "chosen": "img0.png", "rejected": "img1.png"},
        {"prompt": "all tied", "images": ["img0.png", "img1.png"], "ranks": [1, 1]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_generic_reader_counts_pairs_ties_and_invalid_rows(generic_jsonl):
    groups, report = read_dataset("generic", generic_jsonl)
    assert [g.prompt for g in groups] == ["a red circle", "two blue squares", "a wide scene", "broken", "all tied"]
    assert groups[0].confidence == 0.8 and groups[0].pairs() == [(0, 1)]
    assert sorted(groups[1].pairs()) == [(1, 0), (1, 2)] and groups[1].tied_pairs() == 1
    assert report.to_dict() == {"rows": 6, "groups": 5, "pairs": 5, "tied_pairs": 2, "invalid_rows": 1,
                                "invalid_by_reason": {"missing prompt": 1}}


def test_csv_generic_reader_accepts_semicolon_lists(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,images,ranks\na cat,a.png;b.png;c.png,1;3;2\na dog,a.png,1\n")
    groups, report = read_dataset("generic", tmp_path / "d.csv")
    assert len(groups) == 1 and sorted(groups[0].pairs()) == [(0, 1), (0, 2), (2, 1)]
    assert report.invalid == {"fewer than two images": 1}


def test_hpdv3_and_imagereward_layouts(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps([
        {"prompt": "p", "path1": "images/a.jpg", "path2": "images/b.jpg", "model1": "flux", "model2": "sdxl",
         "choice_dist": [12, 7], "confidence": 0.97},
        {"prompt": "q", "path1": "images/c.jpg", "path2": None, "model1": "x", "model2": "y"},
    ]))
    groups, report = read_dataset("hpdv3", tmp_path / "test.json", images_root=tmp_path / "root")
    assert groups[0].images == [tmp_path / "root/images/a.jpg", tmp_path / "root/images/b.jpg"]
    assert groups[0].pairs() == [(0, 1)] and groups[0].source == "hpdv3:flux-vs-sdxl"
    assert groups[0].confidence == pytest.approx(12 / 19)  # HPSv3's soft label from choice_dist, not the confidence
    assert report.invalid == {"missing path2": 1}
    (tmp_path / "ir.json").write_text(json.dumps([
        {"id": "005658-0040", "prompt": "portal", "generations": ["a.webp", "b.webp", "c.webp", "d.webp"], "ranking": [1, 2, 5, 3]},
        {"id": "x", "prompt": "cat", "generations": ["a.webp", "b.webp"], "ranking": [1]},
    ]))
    groups, report = read_dataset("imagereward", tmp_path / "ir.json")
    assert groups[0].group_id == "005658-0040" and len(groups[0].pairs()) == 6 and (0, 2) in groups[0].pairs()
    assert report.invalid == {"images and ranks differ in length": 1}


def test_hpdv3_labels_filters_and_range_checks(tmp_path):
    rows = [
        {"prompt": "a", "path1": "a1.jpg", "path2": "a2.jpg", "choice_dist": [3, 1], "confidence": 0.99},
        {"prompt": "b", "path1": "b1.jpg", "path2": "b2.jpg", "choice_dist": [0.55, 0.45], "confidence": 0.90},
        {"prompt": "c", "path1": "c1.jpg", "path2": "c2.jpg", "confidence": 0.96},
        {"prompt": "d", "path1": "d1.jpg", "path2": "d2.jpg", "choice_dist": [0, 5]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    groups, _ = read_dataset("hpdv3", tmp_path / "train.json")
    assert [g.confidence for g in groups] == pytest.approx([0.75, 0.55, 1.0, 1.0])  # no choice_dist: the hard label
    hard, _ = read_dataset("hpdv3", tmp_path / "train.json", rules=LabelRules(soft_labels=False))
    assert [g.confidence for g in hard] == [1.0] * 4
    kept, report = read_dataset("hpdv3", tmp_path / "train.json", rules=LabelRules(min_confidence=0.95))
    assert [g.prompt for g in kept] == ["a", "c", "d"] and report.invalid == {"confidence below 0.95": 1}
    kept, report = read_dataset("hpdv3", tmp_path / "train.json", rules=LabelRules(min_vote_share=0.6))
    assert [g.prompt for g in kept] == ["a", "c", "d"] and report.invalid == {"vote share of path1 not above 0.6": 1}
    for bad, message in (({"confidence": 1.7}, "confidence 1.7 is outside"), ({"confidence": -3}, "confidence -3 is outside"),
                         ({"choice_dist": [1, -1]}, "choice_dist"), ({"choice_dist": [0, 0]}, "positive sum")):
        (tmp_path / "bad.json").write_text(json.dumps([rows[0], {**rows[1], **bad}]))
        with pytest.raises(ValueError, match=f"bad.json, row 1: .*{message}"):
            read_dataset("hpdv3", tmp_path / "bad.json")
    (tmp_path / "generic.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "b.png", "confidence": 1.7}))
    with pytest.raises(ValueError, match="generic.jsonl, row 0: confidence 1.7 is outside"):
        read_dataset("generic", tmp_path / "generic.jsonl")


def test_pickapic_reader_reads_row_groups_labels_and_ties(tmp_path):
    rows = {
        "caption": ["a", "b", "c", "d", "e"],
        "jpg_0": [png_bytes(i) for i in range(5)],
        "jpg_1": [png_bytes(10 + i) for i in range(5)],
        "label_0": [1.0, 0.0, 0.5, 1.0, 1.0],
        "label_1": [0.0, 1.0, 0.5, 0.0, 0.0],
        "has_label": [True, True, True, False, True],
        "are_different": [True, True, True, True, False],
        "image_0_uid": [f"u{i}" for i in range(5)],
        "image_1_uid": [f"v{i}" for i in range(5)],
        "ranking_id": list(range(100, 105)),
    }
    pq.write_table(pa.table(rows), tmp_path / "train-00000.parquet", row_group_size=2)
    units = dataset_units("pickapic", tmp_path)
    assert [u.name for u in units] == ["train-00000.parquet:rg0", "train-00000.parquet:rg1", "train-00000.parquet:rg2"]
    groups, report = read_dataset("pickapic", tmp_path)
    assert [g.pairs() for g in groups] == [[(0, 1)], [(1, 0)], []]
    assert groups[0].image_ids == ["u0", "v0"] and groups[0].group_id == "100" and isinstance(groups[0].images[0], bytes)
    assert report.tied_pairs == 1
    assert report.invalid == {"unlabelled pair (has_label=0)": 1, "identical images (are_different=0)": 1}
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="not Pick-a-Pic v2 parquet"):
        dataset_units("pickapic", tmp_path / "bad.parquet")


def test_a_folder_of_several_splits_needs_one_named(tmp_path, generic_jsonl):
    """Pick-a-Pic's data/ folder holds train, validation, test and the _unique splits side by side."""
    def write(name, captions):
        rows = {"caption": captions, "jpg_0": [png_bytes(1)] * len(captions), "jpg_1": [png_bytes(2)] * len(captions),
                "label_0": [1.0] * len(captions), "label_1": [0.0] * len(captions)}
        pq.write_table(pa.table(rows), tmp_path / "data" / name)

    (tmp_path / "data").mkdir()
    write("train-00000-of-00002-aa.parquet", ["t1", "t2"])
    write("train-00001-of-00002-bb.parquet", ["t3"])
    write("validation_unique-00000-of-00001-cc.parquet", ["v1"])
    write("test_unique-00000-of-00001-dd.parquet", ["u1", "u2"])
    with pytest.raises(ValueError, match=r"holds several splits \(test_unique, train, validation_unique\): pass --split"):
        dataset_units("pickapic", tmp_path / "data")
    groups, _ = read_dataset("pickapic", tmp_path / "data", split="test_unique")
    assert [g.prompt for g in groups] == ["u1", "u2"]
    assert [g.prompt for g in read_dataset("pickapic", tmp_path / "data", split="train")[0]] == ["t1", "t2", "t3"]
    with pytest.raises(ValueError, match="has no split 'test'; its splits: test_unique, train, validation_unique"):
        dataset_units("pickapic", tmp_path / "data", split="test")
    with pytest.raises(ValueError, match="--split picks one split of a parquet dataset folder"):
        dataset_units("generic", generic_jsonl, split="test")


def test_unknown_format_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format 'laion'"):
        dataset_units("laion", tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        dataset_units("hpdv3", tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no rows"):
        dataset_units("hpdv3", tmp_path / "empty.json")


def test_buckets_are_valid_latent_sizes_near_the_reference_area():
    buckets = aspect_ratio_buckets(1024, 16)
    assert (1024, 1024) in buckets and all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert all(abs(h * w / 1024**2 - 1) < 0.1 for h, w in buckets)
    assert nearest_bucket([(1080, 1920)], buckets)[1] > nearest_bucket([(1080, 1920)], buckets)[0]
    assert nearest_bucket([(800, 800), (820, 780)], buckets) == (1024, 1024)
    image = resize_to_bucket(Image.new("RGB", (300, 200)), (64, 128))
    assert image.size == (128, 64)


def test_prepare_writes_bucketed_latents_that_match_direct_encoding(generic_jsonl, tmp_path, pipe):
    config = PrepareConfig(format="generic", input=str(generic_jsonl), out=str(tmp_path / "shards"), model="unused",
                           groups_per_shard=2, cache_prompt_embeds=True, max_sequence_length=8)
    index_path = prepare(config, pipe=pipe)
    index = read_index(index_path.parent)
    assert index["num_pairs"] == 4 and index["buckets"] == {"4x16": 1, "8x8": 3} and index["prompt_embeds"] is True
    assert index["report"]["invalid_by_reason"] == {"missing image file": 1, "missing prompt": 1}
    assert index["report"]["tied_pairs"] == 2 and len(index["shards"]) == 3
    table = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").to_pylist()
    first = table[0]
    assert (first["prompt"], first["chosen_id"], first["rejected_id"]) == ("a red circle", "img0.png", "img1.png")
    assert first["confidence"] == pytest.approx(0.8)
    pixels = torch.from_numpy(np.asarray(Image.open(generic_jsonl.parent / "img0.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        expected = vae_encode(pipe.vae, pixels[None])[0].numpy()
    stored = np.frombuffer(first["chosen"], dtype=np.float16).reshape(first["latent_shape"])
    np.testing.assert_allclose(stored, expected, atol=2e-3, rtol=2e-3)
    states, pooled = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=8)(["a red circle"])
    embeds = np.frombuffer(first["prompt_embeds"], dtype=np.float16).reshape(first["prompt_embeds_shape"])
    np.testing.assert_allclose(embeds, states[0].numpy(), atol=2e-3, rtol=2e-3)
    wide = [r for r in pq.read_table(tmp_path / "shards" / "shard-00001.parquet").to_pylist() if r["prompt"] == "a wide scene"]
    assert wide[0]["latent_shape"] == [4, 4, 16]


def test_prepare_resumes_by_skipping_finished_shards_and_is_deterministic(generic_jsonl, tmp_path, pipe, monkeypatch):
    config = PrepareConfig(format="generic", input=str(generic_jsonl), out=str(tmp_path / "a"), model="unused", groups_per_shard=2)
    prepare(config, pipe=pipe)
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("shard-*.parquet")}
    (tmp_path / "a" / "shard-00001.parquet").unlink()
    (tmp_path / "a" / "shard-00002.parquet").write_bytes(b"truncated by a crash")
    encoded = []
    original = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: encoded.append(len(x)) or original(x))
    prepare(config, pipe=pipe)
    assert sum(encoded) == 2  # unit 1 again (2 images); unit 2 has no untied pair to encode; unit 0 skipped
    again = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("shard-*.parquet")}
    assert again == first


@pytest.mark.slow
def test_two_processes_write_the_shards_one_process_writes(generic_jsonl, tmp_path, pipe, pipeline_dir):
    config = PrepareConfig(format="generic", input=str(generic_jsonl), out=str(tmp_path / "one"), model="unused", groups_per_shard=1)
    prepare(config, pipe=pipe)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dina_lrm", "prepare", "--format", "generic",
               "--input", str(generic_jsonl), "--out", str(tmp_path / "two"), "--model", str(pipeline_dir), "--groups-per-shard", "1"]
    result = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepare [rank 0]" in result.stderr and "4 pairs in 6 shards" in result.stdout and "this rank's 3" in result.stdout
    one = {p.name: pq.read_table(p).drop(["pair_id"]).to_pylist() for p in sorted((tmp_path / "one").glob("shard-*.parquet"))}
    two = {p.name: pq.read_table(p).drop(["pair_id"]).to_pylist() for p in sorted((tmp_path / "two").glob("shard-*.parquet"))}
    assert sorted(two) == sorted(one) and len(one) == 6
    for name, rows in one.items():
        assert [r["chosen_id"] for r in two[name]] == [r["chosen_id"] for r in rows]
        for a, b in zip(rows, two[name]):
            np.testing.assert_allclose(np.frombuffer(b["chosen"], np.float16), np.frombuffer(a["chosen"], np.float16), atol=2e-3)
