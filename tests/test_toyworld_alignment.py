"""The toy-world alignment experiment end to end, at a tiny budget, and its reward plumbing."""

import json

import torch

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.scorer import load_pipeline
from dina_lrm.toyworld.alignment import (
    RUNS,
    ToyAlignmentConfig,
    judge_scores,
    load_pixel_reward,
    run_alignment_experiment,
    save_pixel_reward,
)
from dina_lrm.toyworld.demo import DEMO_MODEL, SHIPPED_GENERATOR
from dina_lrm.toyworld.judge import Judge
from dina_lrm.toyworld.pixel_reward import PixelReward
from dina_lrm.toyworld.scenes import parse_prompt, render, scene_for


def test_pixel_reward_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PixelReward(128, 128).eval()
    path = save_pixel_reward(model, tmp_path / "pixel.safetensors")
    loaded = load_pixel_reward(path)
    pixels, states, pooled = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 5, 128), torch.randn(2, 128)
    torch.testing.assert_close(loaded(pixels, states, pooled), model(pixels, states, pooled))


def test_judge_scores_equal_the_judge_on_uint8_images():
    import numpy as np

    prompt = "two red circles"
    image = render(scene_for(parse_prompt(prompt), np.random.default_rng(0)))
    scores = judge_scores(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, [prompt])
    assert scores.item() == Judge()(image, prompt).score


def test_experiment_writes_a_table_and_plot_for_every_run(tmp_path):
    pipe = load_pipeline(SHIPPED_GENERATOR)
    reward_dir = DiNaLRM(DiNaConfig.from_dict({"model": DEMO_MODEL}), pipe.transformer).save_pretrained(tmp_path / "reward")
    torch.manual_seed(0)
    pixel_path = save_pixel_reward(PixelReward(128, 128), tmp_path / "pixel.safetensors")
    config = ToyAlignmentConfig(budget_s=0.5, eval_every=1, num_eval_prompts=2, prompts_per_step=1)
    summary = run_alignment_experiment(tmp_path / "alignment", reward_dir, pixel_path, SHIPPED_GENERATOR, config)
    assert set(summary["runs"]) == set(RUNS)
    for run in summary["runs"].values():
        assert run["steps"] >= 1 and run["reward_ms_per_sample"] > 0 and 0 <= run["judge_end"] <= 1
    table = (tmp_path / "alignment" / "alignment.md").read_text()
    assert all(name in table for name in RUNS)
    assert (tmp_path / "alignment" / "alignment.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "alignment" / "alignment.json").read_text())
    assert saved["runs"]["GRPO + judge (upper bound)"]["judge_start"] == summary["runs"]["GRPO + judge (upper bound)"]["judge_start"]
