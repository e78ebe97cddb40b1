"""``dina-lrm eval`` end to end on a judge-ranked toy benchmark with tiny models, the benchmark
readers, bad input, and the two-process gather."""

import csv
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

from helpers import tiny_config
from dina_lrm import DiNaLRM
from dina_lrm.data.readers import read_dataset
from dina_lrm.eval.official import official_accuracy
from dina_lrm.eval.protocol import PairIndex
from dina_lrm.rewards import FunctionReward
from dina_lrm.eval.runner import EvalConfig, evaluate
from dina_lrm_toyworld.benchmark import competition_ranks, write_toy_benchmark
from dina_lrm_toyworld.judge import Judge

FAST = {"u_values": [0.2, 0.5], "draws": [2], "level_sets": [[0.2, 0.5]], "bootstrap_resamples": 200, "batch_size": 5}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    return write_toy_benchmark(tmp_path_factory.mktemp("bench"), prompts=6, images_per_prompt=3, seed=1)


@pytest.fixture(scope="module")
def reward_dir(pipeline_dir, tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_dir))
    return DiNaLRM(tiny_config(), pipe.transformer).save_pretrained(tmp_path_factory.mktemp("reward"))


def judge_reward():
    judge = Judge()
    return FunctionReward(lambda images, prompts, metadata: [round(judge(np.asarray(i), p).score, 2) for p, i in zip(prompts, images)], "judge")


def config(benchmark, reward_dir, pipeline_dir, out, **overrides):
    return EvalConfig(format="hpdv2", input=str(benchmark), out=str(out), reward=str(reward_dir), model=str(pipeline_dir),
                      max_sequence_length=16, **{**FAST, **overrides})


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_toy_benchmark_ranks_follow_the_judge(benchmark):
    assert competition_ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 2, 4]
    groups, report = read_dataset("hpdv2", benchmark)
    assert report.groups == 6 and all(len(g.images) == 3 for g in groups)
    assert all(g.images[0].is_file() for g in groups)


def test_eval_end_to_end(benchmark, reward_dir, pipeline_dir, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate(config(benchmark, reward_dir, pipeline_dir, out), reward_fns=[judge_reward()])
    settings = summary["settings"]
    assert list(settings) == ["DiNa-LRM u=0.2", "DiNa-LRM u=0.5", f"DiNa-LRM u={summary['best_u']:g} x2 draws",
                              "DiNa-LRM levels 0.2+0.5", "judge"]
    # the benchmark's ranks are the judge's, so the judge is right on every untied pair
    assert settings["judge"]["accuracy"] == 1.0 and settings["judge"]["ci"] == [1.0, 1.0]
    groups, _ = read_dataset("hpdv2", benchmark)
    pairs = PairIndex.of(groups)
    assert summary["benchmark"]["pairs"] == len(pairs) == settings["judge"]["pairs"]
    assert summary["benchmark"]["files"] == [benchmark.name] and summary["benchmark"]["split"] is None
    assert settings["judge"]["official"] == {"metric": "HPSv2 inversion accuracy", "accuracy": 1.0}
    # accuracies recomputed independently from the per-image CSV
    samples = read_csv(out / "samples.csv")
    assert len(samples) == 18 and samples[0]["image_id"] == "images/0000_0.png"
    for name, entry in settings.items():
        scores = np.array([float(row[name]) for row in samples])
        assert pairs.wins(scores).mean() == pytest.approx(entry["accuracy"], abs=1e-6)
        assert official_accuracy("hpdv2", groups, scores, None) == pytest.approx(entry["official"]["accuracy"], abs=1e-9)
        assert entry["ci"][0] <= entry["accuracy"] <= entry["ci"][1]
        assert entry["images_per_s"] > 0 and entry["peak_mib"] > 0
    assert settings["DiNa-LRM levels 0.2+0.5"]["gflops_per_image"] == pytest.approx(2 * settings["DiNa-LRM u=0.2"]["gflops_per_image"], rel=0.05)
    assert len(read_csv(out / "pairs.csv")) == len(pairs)
    assert summary["calibration"]["setting"] == f"DiNa-LRM u={summary['best_u']:g}"
    for name in ("report.md", "accuracy_vs_u.png", "ensemble_scaling.png", "calibration.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert f"Read 1 files: {benchmark.name}." in report
    assert "0.5 when the two model scores are equal" in report and "| judge | 1.0000 |" in report

    shards = sorted((out / "latents").glob("shard-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = evaluate(config(benchmark, reward_dir, pipeline_dir, out, u_values=[0.2]), overwrite=True)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # the latent cache was reused (kept by --overwrite), not rebuilt
    assert again["settings"]["DiNa-LRM u=0.2"]["accuracy"] == settings["DiNa-LRM u=0.2"]["accuracy"]


def test_missing_images_refuse_unless_skipped(benchmark, reward_dir, pipeline_dir, tmp_path):
    copy = tmp_path / "bench"
    copy.mkdir()
    (copy / "test.json").write_text(benchmark.read_text())
    (copy / "images").symlink_to(benchmark.parent / "images")
    rows = json.loads(benchmark.read_text())
    rows[0]["image_path"][1] = "images/gone.png"
    (copy / "test.json").write_text(json.dumps(rows))
    with pytest.raises(FileNotFoundError, match="1 images of the benchmark are missing"):
        evaluate(config(copy / "test.json", reward_dir, pipeline_dir, tmp_path / "a"))
    assert "images/gone.png\tmissing" in (tmp_path / "a" / "missing_images.txt").read_text()
    with pytest.raises(FileNotFoundError, match=r"Every image is missing: .* hpdv2 images usually live in the release's test/ folder"):
        evaluate(config(copy / "test.json", reward_dir, pipeline_dir, tmp_path / "c", images_root=str(tmp_path / "nowhere")))
    summary = evaluate(config(copy / "test.json", reward_dir, pipeline_dir, tmp_path / "b", skip_missing=True, u_values=[0.3]))
    assert summary["benchmark"]["missing_images"] == 1
    assert summary["benchmark"]["images"] == 17


def test_bad_reward_outputs_and_empty_benchmarks_are_refused(benchmark, reward_dir, pipeline_dir, tmp_path):
    nan = FunctionReward(lambda images, prompts, metadata: [float("nan")] * len(images), "nan")
    with pytest.raises(FloatingPointError, match="nan returned NaN"):
        evaluate(EvalConfig(format="hpdv2", input=str(benchmark), out=str(tmp_path / "n"), **FAST), reward_fns=[nan])
    ties = tmp_path / "ties.json"
    ties.write_text(json.dumps([{"prompt": "p", "image_path": ["a.png", "b.png"], "rank": [1, 1]},
                                {"prompt": "q", "image_path": ["a.png"], "rank": [1]}]))
    with pytest.raises(ValueError, match="no comparable pair"):
        evaluate(EvalConfig(format="hpdv2", input=str(ties), out=str(tmp_path / "t"), **FAST), reward_fns=[judge_reward()])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(EvalConfig(format="hpdv2", input=str(benchmark), out=str(tmp_path / "x")))


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_genai_bench_parquet_votes(tmp_path):
    image = {"bytes": _png("red"), "path": None}
    rows = [
        {"prompt": "a", "left_image": image, "right_image": image, "vote_type": "rightvote", "left_model": "m1", "right_model": "m2"},
        {"prompt": "b", "left_image": image, "right_image": image, "vote_type": "tievote", "left_model": "m1", "right_model": "m2"},
        {"prompt": "c", "left_image": image, "right_image": image, "vote_type": "bothbad_vote", "left_model": "m1", "right_model": "m2"},
        {"prompt": "d", "left_image": image, "right_image": image, "vote_type": "maybe", "left_model": "m1", "right_model": "m2"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    groups, report = read_dataset("genai_bench", tmp_path)
    assert [g.ranks for g in groups] == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert groups[0].pairs() == [(1, 0)] and groups[0].image_ids == ["0/left:m1", "0/right:m2"]
    assert report.tied_pairs == 2 and sum(report.invalid.values()) == 1
    assert isinstance(groups[0].images[0], bytes)


@pytest.mark.slow
def test_two_processes_gather_the_same_scores_as_one(benchmark, reward_dir, pipeline_dir, tmp_path):
    common = ["--format", "hpdv2", "--input", str(benchmark), "--reward", str(reward_dir), "--model", str(pipeline_dir),
              "--max-sequence-length", "16", "--u", "0.3", "0.6", "--draws", "2", "--levels", "0.3,0.6", "--batch-size", "4",
              "--resamples", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "dina_lrm", "eval", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dina_lrm", "eval", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one" / "samples.csv").read_text() == (tmp_path / "two" / "samples.csv").read_text()
    first, second = (json.loads((tmp_path / d / "summary.json").read_text())["settings"] for d in ("one", "two"))
    assert {k: v["accuracy"] for k, v in first.items()} == {k: v["accuracy"] for k, v in second.items()}
    assert {v["processes"] for v in second.values()} == {2}
    assert len(list((tmp_path / "two" / "latents").glob("shard-*.parquet"))) == 1


def test_cli_reads_yaml_flags_override_and_extra_rewards_join_the_table(benchmark, tmp_path, capsys):
    from dina_lrm.cli import main

    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "from dina_lrm.rewards import FunctionReward\n"
        "import numpy as np\n"
        "def brightness():\n"
        "    return FunctionReward(lambda images, prompts, metadata: [float(np.asarray(i).mean()) for i in images], 'brightness')\n"
    )
    yaml_config = tmp_path / "eval.yaml"
    yaml_config.write_text(f"format: hpdv2\ninput: {benchmark}\nout: {tmp_path / 'ignored'}\nbootstrap_resamples: 50\n")
    out = tmp_path / "cli"
    code = main(["eval", "--config", str(yaml_config), "--out", str(out), "--extra-reward", f"{rewards}:brightness"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["settings"]) == ["brightness"] and summary["config"]["bootstrap_resamples"] == 50
    assert "| brightness |" in capsys.readouterr().out
    assert not (tmp_path / "ignored").exists()
    yaml_config.write_text("formatt: hpdv2\n")
    assert main(["eval", "--config", str(yaml_config)]) == 2
    assert "did you mean 'format'" in capsys.readouterr().err
    assert main(["eval", "--format", "hpdv2", "--input", str(benchmark), "--extra-reward", "no_such_module_here:x", "--out", str(tmp_path / "x")]) != 0


def test_pickapic_official_metric_scores_the_human_ties_too(tmp_path):
    """A Pick-a-Pic file with one tie: ours leaves it out, PickScore's metric counts it."""
    shades = {"dark": _png((40, 40, 40)), "mid": _png((120, 120, 120)), "light": _png((200, 200, 200))}
    rows = {"caption": ["a", "b", "c"], "jpg_0": [shades["light"], shades["dark"], shades["mid"]],
            "jpg_1": [shades["dark"], shades["light"], shades["mid"]], "label_0": [1.0, 1.0, 0.5], "label_1": [0.0, 0.0, 0.5]}
    pq.write_table(pa.table(rows), tmp_path / "test_unique-00000-of-00001.parquet")
    brightness = FunctionReward(lambda images, prompts, metadata: [float(np.asarray(i).mean()) / 255 for i in images], "brightness")
    summary = evaluate(EvalConfig(format="pickapic", input=str(tmp_path), split="test_unique", out=str(tmp_path / "out"),
                                  bootstrap_resamples=20), reward_fns=[brightness])
    entry = summary["settings"]["brightness"]
    # ours: pair a right, pair b wrong (the darker image was preferred), the tie left out -> 1/2
    assert entry["accuracy"] == 0.5 and entry["pairs"] == 2 and summary["benchmark"]["tied_groups_scored"] == 1
    # PickScore: a right 1, b wrong 0, the tie: equal images, predicted tie at threshold 0 -> 1; mean 2/3
    assert entry["official"] == {"metric": "PickScore tie-aware accuracy", "accuracy": pytest.approx(2 / 3)}
    assert summary["benchmark"]["split"] == "test_unique" and "of split 'test_unique'" in (tmp_path / "out" / "report.md").read_text()


def test_imagereward_and_genai_bench_official_metrics_in_their_layouts(tmp_path):
    brightness = FunctionReward(lambda images, prompts, metadata: [float(np.asarray(i).mean()) / 255 for i in images], "brightness")
    for name, level in (("dark", 40), ("mid", 120), ("light", 200)):
        (tmp_path / f"{name}.png").write_bytes(_png((level, level, level)))
    # ImageReward test.json: brightness agrees with (light, mid, dark) = ranks (1, 2, 3) on all 3 pairs of prompt 0;
    # prompt 1 ranks two equally bright images differently: a model tie, wrong officially, half right in ours
    (tmp_path / "test.json").write_text(json.dumps([
        {"id": "0", "prompt": "p", "generations": ["light.png", "mid.png", "dark.png"], "ranking": [1, 2, 3]},
        {"id": "1", "prompt": "q", "generations": ["mid.png", "mid.png"], "ranking": [1, 2]},
    ]))
    summary = evaluate(EvalConfig(format="imagereward", input=str(tmp_path / "test.json"), out=str(tmp_path / "ir"),
                                  bootstrap_resamples=20), reward_fns=[brightness])
    entry = summary["settings"]["brightness"]
    assert entry["accuracy"] == pytest.approx(3.5 / 4) and entry["official"]["accuracy"] == pytest.approx(3 / 4)
    # GenAI-Bench: leftvote (light vs dark) right; rightvote (light vs dark) wrong; tievote on equal images right;
    # bothbad_vote never matched -> 2 of 4
    light, dark, mid = ({"bytes": (tmp_path / f"{n}.png").read_bytes(), "path": None} for n in ("light", "dark", "mid"))
    rows = [{"prompt": "a", "left_image": light, "right_image": dark, "vote_type": "leftvote"},
            {"prompt": "b", "left_image": light, "right_image": dark, "vote_type": "rightvote"},
            {"prompt": "c", "left_image": mid, "right_image": mid, "vote_type": "tievote"},
            {"prompt": "d", "left_image": mid, "right_image": mid, "vote_type": "bothbad_vote"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    summary = evaluate(EvalConfig(format="genai_bench", input=str(tmp_path / "test-00000-of-00001.parquet"), out=str(tmp_path / "gb"),
                                  bootstrap_resamples=20), reward_fns=[brightness])
    entry = summary["settings"]["brightness"]
    assert entry["accuracy"] == 0.5 and entry["official"] == {"metric": "GenAI-Bench 4-way accuracy", "accuracy": 0.5}
    assert summary["benchmark"]["tied_groups_scored"] == 2
