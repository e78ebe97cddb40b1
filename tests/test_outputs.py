"""Re-runs never overwrite or mix earlier results: prepare, train, eval and align refuse a folder that
holds another run (listing the differences) unless --overwrite; damaged shards are named; eval
refuses images outside its root."""

import json
import shutil

import pytest
from test_align import make_config
from test_data_prepare import generic_jsonl  # noqa: F401 (a fixture)
from test_eval_end_to_end import benchmark, config  # noqa: F401 (a fixture)
from test_eval_end_to_end import reward_dir as eval_reward_dir  # noqa: F401 (a fixture)
from helpers import reset_accelerate
from test_train import metrics, raw_config, separable_pairs

from dina_lrm.align.trainer import Aligner
from dina_lrm.config import DiNaConfig
from dina_lrm.data.loader import pair_loader
from dina_lrm.data.prepare import PrepareConfig, prepare
from dina_lrm.data.shards import load_preference_shards, read_index
from dina_lrm.eval.runner import evaluate
from dina_lrm.outputs import OutputExists, claim_output
from dina_lrm.train.trainer import train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_prepare_refuses_other_settings_continues_the_same_and_overwrites_cleanly(generic_jsonl, tmp_path, pipe):  # noqa: F811
    def settings(groups):
        return PrepareConfig(format="generic", input=str(generic_jsonl), out=str(tmp_path / "shards"), model="unused", groups_per_shard=groups)

    prepare(settings(2), pipe=pipe)
    assert read_index(tmp_path / "shards")["num_pairs"] == 4
    prepare(settings(2), pipe=pipe)  # the same settings: continues (nothing left to do)
    with pytest.raises(OutputExists, match=r"other settings \(groups_per_shard: 2 -> 1\).*--overwrite"):
        prepare(settings(1), pipe=pipe)
    prepare(settings(1), pipe=pipe, overwrite=True)
    index = read_index(tmp_path / "shards")
    assert index["num_pairs"] == 4 and index["metadata"]["groups_per_shard"] == 1
    assert len(list((tmp_path / "shards").glob("shard-*.parquet"))) == len(index["shards"])


def train_config(tmp_path, pipeline_dir, train_dir, **training):
    return DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 4, **training}))


def test_train_refuses_a_used_run_directory_without_resume_or_overwrite(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 16)
    train(train_config(tmp_path, pipeline_dir, train_dir))
    reset_accelerate()
    with pytest.raises(OutputExists, match="with these settings; pass --resume latest to continue it, or --overwrite"):
        train(train_config(tmp_path, pipeline_dir, train_dir))
    reset_accelerate()
    with pytest.raises(OutputExists, match=r"other settings \(training.learning_rate: 0.002 -> 0.001"):
        train(train_config(tmp_path, pipeline_dir, train_dir, learning_rate=1e-3))
    reset_accelerate()
    elsewhere = train_config(tmp_path, pipeline_dir, train_dir)
    elsewhere.model.backbone_model_id = str(tmp_path / "no-such-generator")
    with pytest.raises(OutputExists, match="backbone_model_id"):  # refused before the (missing) generator would load
        train(elsewhere)
    reset_accelerate()
    config = train_config(tmp_path, pipeline_dir, train_dir, learning_rate=1e-3, max_steps=2)
    train(config, overwrite=True)
    assert [row["step"] for row in metrics(config.paths.run_dir) if "train/loss" in row] == [1, 2]
    assert sorted(p.name for p in (config.paths.run_dir / "checkpoints").iterdir()) == ["step-0000002"]


def test_eval_refuses_to_overwrite_a_report(benchmark, eval_reward_dir, pipeline_dir, tmp_path):  # noqa: F811
    first = evaluate(config(benchmark, eval_reward_dir, pipeline_dir, tmp_path / "out", u_values=[0.3]))
    report = (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(OutputExists, match="already holds eval results with these settings; pass --overwrite"):
        evaluate(config(benchmark, eval_reward_dir, pipeline_dir, tmp_path / "out", u_values=[0.3]))
    with pytest.raises(OutputExists, match=r"u_values: \[0.3\] -> \[0.4\]"):
        evaluate(config(benchmark, eval_reward_dir, pipeline_dir, tmp_path / "out", u_values=[0.4]))
    assert (tmp_path / "out" / "report.md").read_text() == report
    again = evaluate(config(benchmark, eval_reward_dir, pipeline_dir, tmp_path / "out", u_values=[0.4]), overwrite=True)
    assert again["benchmark"]["pairs"] == first["benchmark"]["pairs"] and "u=0.4" in (tmp_path / "out" / "report.md").read_text()


def test_eval_refuses_images_outside_the_root_and_counts_them_when_allowed(benchmark, eval_reward_dir, pipeline_dir, tmp_path):  # noqa: F811
    copy = tmp_path / "bench"
    shutil.copytree(benchmark.parent, copy)
    rows = json.loads((copy / benchmark.name).read_text())
    outside = tmp_path / "elsewhere.png"
    shutil.copy(copy / rows[0]["image_path"][1], outside)
    rows[0]["image_path"][1] = "../elsewhere.png"
    (copy / benchmark.name).write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="1 images of the benchmark lie outside the images root"):
        evaluate(config(copy / benchmark.name, eval_reward_dir, pipeline_dir, tmp_path / "a", u_values=[0.3]))
    summary = evaluate(config(copy / benchmark.name, eval_reward_dir, pipeline_dir, tmp_path / "b", u_values=[0.3], allow_outside_root=True))
    assert summary["benchmark"]["images_outside_root"] == 1 and "1 images read from outside" in (tmp_path / "b" / "report.md").read_text()


def test_align_refuses_a_used_folder(pipeline_dir, reward_dir, prompt_file, tmp_path):
    Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run", max_steps=2)).run()
    with pytest.raises(OutputExists, match="pass --resume latest to continue it, or --overwrite"):
        Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run", max_steps=2))
    with pytest.raises(OutputExists, match="learning_rate: 0.003 -> 0.001"):
        Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run", max_steps=2, learning_rate=1e-3))
    elsewhere = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run", max_steps=2)
    elsewhere.generator = str(tmp_path / "no-such-generator")
    with pytest.raises(OutputExists, match="generator"):  # refused before the (missing) generator would load
        Aligner(elsewhere)


@pytest.mark.parametrize("damage", [b"", b"PAR1 truncated"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    directory = separable_pairs(tmp_path / "shards", 40)
    shard = sorted((tmp_path / "shards").glob("shard-*.parquet"))[1]
    shard.write_bytes(damage)
    for read in (load_preference_shards, lambda d: pair_loader(d, 4, 1, 0)):
        with pytest.raises(ValueError, match=f"parquet file .*{shard.name} is unreadable"):
            read(directory)


def test_claim_output_rules(tmp_path):
    out = tmp_path / "out"
    claim_output(out, "demo", {"steps": 300, "levels": (0.2, 0.5)}, ["report.md"], continues=True)
    (out / "report.md").write_text("earlier results")
    claim_output(out, "demo", {"steps": 300, "levels": [0.2, 0.5]}, ["report.md"], continues=True)  # same settings: redo
    with pytest.raises(OutputExists, match=r"other settings \(steps: 300 -> 50\)"):
        claim_output(out, "demo", {"steps": 50, "levels": [0.2, 0.5]}, ["report.md"], continues=True)
    assert (out / "report.md").read_text() == "earlier results"
    with pytest.raises(OutputExists, match="holds the outputs of `dina-lrm demo`, not eval"):
        claim_output(out, "eval", {}, ["report.md"])
    claim_output(out, "demo", {"steps": 50}, ["report.md"], overwrite=True)
    assert not (out / "report.md").exists() and json.loads((out / "settings.json").read_text())["settings"] == {"steps": 50}
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.md").write_text("written by something else")
    with pytest.raises(OutputExists, match="without a settings.json"):
        claim_output(used, "eval", {}, ["report.md"])
