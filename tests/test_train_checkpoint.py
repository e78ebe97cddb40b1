"""Training checkpoints hold data only: no pickle is ever loaded, damaged files are named, ``latest``
falls back to the newest checkpoint that verifies, a resumed log has each step once, and a run
killed with SIGKILL resumes to the same weights as an uninterrupted one."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from helpers import reset_accelerate
from test_train import metrics, raw_config, separable_pairs

from dina_lrm.config import DiNaConfig
from dina_lrm.train.checkpoint import CheckpointError, load_state, save_state, verify
from dina_lrm.train.trainer import TRAINABLE_NAME, latest_checkpoint, train


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_a_state_round_trips_through_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "numpy": np.random.get_state(), "nan": float("nan"), "none": None, 7: (1, "a")}
    save_state(state, tmp_path, "state")
    back = load_state(tmp_path, "state")
    assert back[7] == (1, "a") and back["none"] is None and np.isnan(back["nan"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][1].dtype == np.uint32
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key], rtol=0, atol=0)
    assert fresh.param_groups[0]["betas"] == (0.9, 0.99)
    assert not list(tmp_path.glob("*.pkl")) and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


class PlantedPayload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def trained_run(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 16)
    raw = raw_config(tmp_path, pipeline_dir, train_dir, training={"max_steps": 8}, logging={"save_frac": 4, "log_every": 1})
    config = DiNaConfig.from_dict(raw)
    train(config)
    reset_accelerate()
    return config


def test_a_planted_pickle_is_never_loaded(trained_run, tmp_path):
    checkpoint = trained_run.paths.run_dir / "checkpoints" / "step-0000008"
    marker = tmp_path / "pwned"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(PlantedPayload(str(marker))))
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl is a pickle file"):
        train(trained_run, resume=str(checkpoint))
    reset_accelerate()
    found, skipped = latest_checkpoint(trained_run.paths.run_dir)
    assert found.name == "step-0000004" and "step-0000008" in skipped[0] and "pickle" in skipped[0]
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_is_named_and_latest_falls_back(trained_run, damage):
    checkpoint = trained_run.paths.run_dir / "checkpoints" / "step-0000008"
    target = checkpoint / "optimizer.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify(checkpoint)
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        train(trained_run, resume=str(checkpoint))
    reset_accelerate()
    found, skipped = latest_checkpoint(trained_run.paths.run_dir)
    assert found.name == "step-0000004" and len(skipped) == 1 and "optimizer.safetensors" in skipped[0]


def test_an_unfinished_checkpoint_without_a_manifest_is_skipped(trained_run):
    (trained_run.paths.run_dir / "checkpoints" / "step-0000008" / "manifest.json").unlink()
    found, skipped = latest_checkpoint(trained_run.paths.run_dir)
    assert found.name == "step-0000004" and "no manifest.json" in skipped[0]


def test_resumed_log_has_each_step_once(trained_run):
    shutil.rmtree(trained_run.paths.run_dir / "checkpoints" / "step-0000008")
    train(trained_run, resume="latest")
    steps = [row["step"] for row in metrics(trained_run.paths.run_dir) if "train/loss" in row]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_sigkill_during_training_then_resume_matches_the_uninterrupted_run(tmp_path, pipeline_dir):
    train_dir = separable_pairs(tmp_path / "train", 24)
    sections = dict(training={"max_steps": 30, "gradient_accumulation_steps": 2}, logging={"save_frac": 3, "log_every": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def command(name):
        raw = raw_config(tmp_path, pipeline_dir, train_dir, **sections, paths={"run_name": name, "save_dir": str(tmp_path / "runs")})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        return [sys.executable, "-m", "dina_lrm", "train", "--config", str(tmp_path / f"{name}.yaml")]

    subprocess.run(command("whole"), env=env, check=True, capture_output=True)
    process = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "runs" / "killed" / "checkpoints"
    while process.poll() is None and not list(checkpoints.glob("step-00000[0-9][0-9]/manifest.json")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*command("killed"), "--resume", "latest"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end_whole = load_file(str(tmp_path / "runs" / "whole" / "checkpoints" / "step-0000030" / TRAINABLE_NAME))
    end_resumed = load_file(str(checkpoints / "step-0000030" / TRAINABLE_NAME))
    assert end_whole.keys() == end_resumed.keys()
    for name, value in end_whole.items():
        torch.testing.assert_close(end_resumed[name], value, rtol=0, atol=0)
    steps = [row["step"] for row in (json.loads(line) for line in (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in row]
    assert steps == list(range(1, 31))
