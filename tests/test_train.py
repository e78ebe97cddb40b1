import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_MODEL, reset_accelerate
from safetensors.torch import load_file

from dina_lrm.config import ConfigError, DiNaConfig, load_config
from dina_lrm.data.shards import FORMAT, INDEX_NAME, VERSION, PairRecord, write_preference_shards
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.pipelines import load_pipeline
from dina_lrm.train.trainer import METRICS_NAME, TRAINABLE_NAME, Trainer, latest_checkpoint, train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def separable_pairs(directory, count, seed=0, embeds=False):
    """Chosen latents sit above zero and rejected ones below: a preference any working trainer learns."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        base = rng.normal(size=(4, 8, 8)).astype(np.float32)
        cached = dict(prompt_embeds=rng.normal(size=(12, 32)).astype(np.float32), pooled_prompt_embeds=rng.normal(size=64).astype(np.float32)) if embeds else {}
        records.append(PairRecord(f"a red circle number {i % 5}", base * 0.3 + 0.8, base * 0.3 - 0.8, pair_id=str(i), group_id=str(i), **cached))
    write_preference_shards(directory, records, rows_per_shard=16)
    return str(directory)


def raw_config(tmp_path, pipeline_dir, train_dir, eval_dir=None, **sections):
    raw = {
        "model": {**TINY_MODEL, "backbone_model_id": str(pipeline_dir)},
        "training": {"mixed_precision": "fp32", "learning_rate": 2e-3, "lr_scheduler": "constant_with_warmup", "warmup_steps": 2,
                     "max_steps": 8, "use_ema": True, "ema_decay": 0.9},
        "data": {"train": {"parquet_files": train_dir, "base_batch_size": 4, "max_sequence_length": 16}},
        "paths": {"run_name": "run", "save_dir": str(tmp_path / "runs")},
        "logging": {"eval_frac": 1000, "save_frac": 4, "log_every": 1, "report_to": "none", "eval_u": [0.2, 0.6]},
        "system": {"seed": 0},
    }
    if eval_dir:
        raw["data"]["eval"] = {"held_out": {"parquet_files": eval_dir, "batch_size": 8}}
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def text_batch(size, seed=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 12, 32, generator=generator), torch.randn(size, 64, generator=generator)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]


def test_training_learns_evaluates_and_saves_a_loadable_ema_model(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 48)
    eval_dir = separable_pairs(tmp_path / "eval", 20, seed=1)
    config = DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, eval_dir,
                                             training={"max_steps": 24},
                                             logging={"eval_frac": 12, "save_frac": 12, "report_to": "tensorboard"}))
    trainer = Trainer(config)
    final = trainer.train()
    rows = metrics(config.paths.run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/held_out/accuracy_u0.2" in r]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert [r["step"] for r in evals] == [12, 24] and evals[-1]["eval/held_out/accuracy_u0.2"] >= 0.9
    assert all(r["train/pairs_per_s"] > 0 and r["train/peak_memory_gb"] > 0 and 0 < r["train/lr"] <= 2e-3 for r in rows if "train/lr" in r)
    assert sorted(p.name for p in (config.paths.run_dir / "checkpoints").iterdir()) == ["step-0000012", "step-0000024"]
    assert list(config.paths.run_dir.rglob("events.out.tfevents.*")) and (config.paths.run_dir / "training_curves.png").is_file()

    loaded = DiNaLRM.from_pretrained(final, load_pipeline(pipeline_dir).transformer)
    with trainer.ema_weights():
        ema = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    trained = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    assert any(not torch.equal(ema[n], trained[n]) for n in ema)  # the saved weights are the EMA, not the last step
    for name, param in loaded.named_parameters():
        if name in ema:
            torch.testing.assert_close(param, ema[name])


def test_the_authors_yaml_trains_as_the_release_did_and_names_the_keys_it_ignores(tmp_path, pipeline_dir):
    """Their trainer builds no schedule for lr_scheduler: constant and never turns EMA on: neither do we."""
    train_dir = separable_pairs(tmp_path / "train", 16, embeds=True)
    raw = raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 3, "lr_scheduler": "constant", "warmup_steps": 1000,
                                                                  "use_ema": False})
    raw["model"].update(use_ema=True, ema_decay=0.995)  # where the authors' YAML puts them
    config = DiNaConfig.from_dict(raw)
    with pytest.warns(UserWarning, match=r"the authors' trainer ignores these keys.*model.use_ema.*training.warmup_steps=1000"):
        trainer = Trainer(config)
    final = trainer.train()
    assert trainer.ema is None
    assert [r["train/lr"] for r in metrics(config.paths.run_dir) if "train/lr" in r] == [2e-3] * 3  # no warmup
    loaded = DiNaLRM.from_pretrained(final, load_pipeline(pipeline_dir).transformer)
    trained = {n: p for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    for name, param in loaded.named_parameters():
        if name in trained:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)  # the last step's weights, not an EMA


def test_resume_from_the_half_way_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, pipeline_dir):
    # 40 pairs / 4 per batch = 10 micro-batches = 5 optimizer steps per epoch (accumulating 2):
    # the checkpoint at step 4 is mid-epoch, and steps 5..8 cross into the next epoch.
    train_dir = separable_pairs(tmp_path / "train", 40)
    training = {"max_steps": 8, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine"}
    whole = DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, training=training))
    train(whole)

    resumed = DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, training=training, paths={"run_name": "resumed"}))
    halfway = whole.paths.run_dir / "checkpoints" / "step-0000004"
    shutil.copytree(halfway, resumed.paths.run_dir / "checkpoints" / halfway.name)
    reset_accelerate()
    train(resumed, resume="latest")

    end_whole = load_file(str(whole.paths.run_dir / "checkpoints" / "step-0000008" / TRAINABLE_NAME))
    end_resumed = load_file(str(latest_checkpoint(resumed.paths.run_dir)[0] / TRAINABLE_NAME))
    assert latest_checkpoint(resumed.paths.run_dir)[0].name == "step-0000008"
    for name, value in end_whole.items():
        torch.testing.assert_close(end_resumed[name], value, rtol=1e-5, atol=1e-6)
    whole_losses = {r["step"]: r["train/loss"] for r in metrics(whole.paths.run_dir)}
    resumed_losses = {r["step"]: r["train/loss"] for r in metrics(resumed.paths.run_dir)}
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert resumed_losses == pytest.approx({s: whole_losses[s] for s in resumed_losses}, rel=1e-5)


def test_resume_refuses_another_configuration_and_a_missing_checkpoint(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 16, embeds=True)
    raw = raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 4})
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        train(DiNaConfig.from_dict(raw), resume="latest")
    reset_accelerate()
    train(DiNaConfig.from_dict(raw))
    reset_accelerate()
    raw["training"]["learning_rate"] = 1e-4
    raw["model"]["lora_config"] = {"r": 8, "lora_alpha": 8}
    with pytest.raises(ValueError, match=r"another configuration \(model.lora_config.r: 4 -> 8; training.learning_rate"):
        train(DiNaConfig.from_dict(raw), resume="latest")


def test_cached_embeddings_of_another_t5_length_are_refused(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 8, embeds=True)
    index_path = tmp_path / "train" / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["metadata"]["max_sequence_length"] = 12
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="cache prompt embeddings of 12 T5 tokens but data.train.max_sequence_length is 16"):
        Trainer(DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir)))


def test_bad_training_inputs_fail_with_clear_errors(tmp_path, pipeline_dir):
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump({"training": {"learning_rat": 1e-4}}))
    with pytest.raises(ConfigError, match="unknown config key 'training.learning_rat' \\(did you mean 'learning_rate'"):
        load_config(config_path)
    config_path.write_text("{}")
    with pytest.raises(ConfigError, match="unknown config key 'training.max_step'"):
        load_config(config_path, ["training.learning_rate=1e-4", "training.max_step=3"])
    assert load_config(config_path, ["training.max_steps=3", "data.train.parquet_files=[a, b]"]).data.train.parquet_files == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no preference shards at"):
        Trainer(DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, str(tmp_path / "nowhere"))))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / INDEX_NAME).write_text(json.dumps({"format": FORMAT, "version": VERSION, "shards": [], "num_pairs": 0}))
    with pytest.raises(ValueError, match="lists no pairs"):
        Trainer(DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, str(empty))))
    wrong_width = separable_pairs(tmp_path / "wide", 8, embeds=True)
    raw = raw_config(tmp_path, pipeline_dir, wrong_width, training={"max_steps": 1})
    raw["model"]["backbone_model_id"] = str(tmp_path / "no-such-generator")
    with pytest.raises(OSError, match="cannot load the generator pipeline"):
        Trainer(DiNaConfig.from_dict(raw))


def test_bf16_keeps_frozen_weights_in_bf16_and_trains_float32_ones(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 16, embeds=True)
    trainer = Trainer(DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 3, "mixed_precision": "bf16"})))
    trainer.train()
    params = dict(trainer.unwrapped.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    losses = [r["train/loss"] for r in metrics(trainer.run_dir)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        DiNaConfig.from_dict({"training": {"mixed_precision": "fp8"}})


@pytest.mark.slow
def test_two_processes_follow_one_process_with_the_doubled_batch(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 48)
    single = DiNaConfig.from_dict(raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 4},
                                             data={"train": {"parquet_files": train_dir, "base_batch_size": 8, "max_sequence_length": 16}},
                                             paths={"run_name": "single"}))
    train(single)
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 4}, paths={"run_name": "two"})))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dina_lrm", "train", "--config", str(config_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two_dir = tmp_path / "runs" / "two"
    for key in ("train/loss", "train/grad_norm", "train/accuracy"):  # grad_norm: averaged, not summed, over ranks
        one = [r[key] for r in metrics(single.paths.run_dir)]
        two = [r[key] for r in metrics(two_dir)]
        assert len(one) == len(two) == 4 and two == pytest.approx(one, rel=1e-4)
    assert len({r["train/loss"] for r in metrics(two_dir)}) == 4
    # Compare the learned functions, not raw weights: parameters a pairwise loss cannot see (the output
    # bias, attention key biases) get only rounding noise as gradient, which Adam scales up to ~lr.
    latents, (states, pooled) = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5)), text_batch(6)
    scores = []
    for run_dir in (single.paths.run_dir, two_dir):
        model = DiNaLRM.from_pretrained(run_dir / "reward_model", load_pipeline(pipeline_dir).transformer)
        with torch.no_grad():
            raw = model(latents, states, pooled, torch.full((6,), 300.0))[:, 0]
        scores.append(raw - raw.mean())
    assert scores[0].std() > 1e-3
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_process_fsdp_resumed_at_half_way_ends_where_the_uninterrupted_run_ends(tmp_path, pipeline_dir):
    """FSDP (full shard) over gloo on CPU; torch refuses sync_module_states there, so it is off (every
    process builds the same weights from the same pipeline anyway)."""
    train_dir = separable_pairs(tmp_path / "train", 48)
    fsdp = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy", "NO_WRAP",
            "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]

    def launch(name, max_steps, *extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": max_steps},
                                                  paths={"run_name": name}, logging={"save_frac": 4})))
        command = [sys.executable, "-m", "accelerate.commands.launch", *fsdp, "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dina_lrm", "train", "--config", str(path), *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / "runs" / name

    whole = launch("whole", 8)
    launch("resumed", 4)
    resumed = launch("resumed", 8, "--resume", "latest")
    end_whole = load_file(str(whole / "checkpoints" / "step-0000008" / TRAINABLE_NAME))
    end_resumed = load_file(str(resumed / "checkpoints" / "step-0000008" / TRAINABLE_NAME))
    assert end_whole.keys() == end_resumed.keys() and len(end_whole) > 100
    for name, value in end_whole.items():
        torch.testing.assert_close(end_resumed[name], value, rtol=0, atol=0)
    losses = [[r["train/loss"] for r in metrics(run) if "train/loss" in r] for run in (whole, resumed)]
    assert len(losses[0]) == 8 and losses[1] == losses[0] and losses[0][-1] < 0.5 * losses[0][0]
