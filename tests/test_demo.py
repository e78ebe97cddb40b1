import json

import torch
from test_toyworld_data import SMALL

from dina_lrm.cli import main
from dina_lrm.pipelines import load_pipeline
from dina_lrm.scorer import Scorer
from dina_lrm_toyworld.config import U_GRID, PretrainConfig
from dina_lrm_toyworld.demo import DINA_LOSSES, PIXEL_METHOD, SHIPPED_GENERATOR
from dina_lrm_toyworld.generator import T5_TOKENS
from dina_lrm_toyworld.pretrain import pretrain


def test_shipped_generator_is_small_and_loads():
    size = sum(f.stat().st_size for f in SHIPPED_GENERATOR.rglob("*") if f.is_file())
    assert size < 20e6
    pipe = load_pipeline(SHIPPED_GENERATOR)
    assert pipe.transformer.config.dual_attention_layers and pipe.vae_scale_factor == 4
    record = json.loads((SHIPPED_GENERATOR / "pretrain.json").read_text())
    assert record["config"]["seed"] == 0


def test_tiny_end_to_end_demo(tmp_path):
    flags = ["--data.train_prompts", "6", "--data.test_prompts", "4", "--data.samples_per_prompt", "3", "--data.sampling_steps", "3",
             "--data.batch_size", "16", "--steps", "2", "--eval-every", "1", "--monitor-pairs", "8", "--benchmark-prompts", "3",
             "--search-prompts", "1"]
    assert main(["demo", "--out", str(tmp_path), *flags]) == 0  # the command, its flags generated from DemoConfig
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["data"]["train_prompts"] == 6 and summary["config"]["steps"] == 2
    accuracy = summary["accuracy"]
    for name in DINA_LOSSES:
        assert len(accuracy[name]["per_u"]) == len(U_GRID)
        assert all(0 <= v <= 1 for v in accuracy[name]["per_u"].values()) and 0 <= accuracy[name]["ensemble"] <= 1
    assert 0 <= accuracy[PIXEL_METHOD]["accuracy"] <= 1
    assert summary["data"]["train"]["pairs"] > 0 and summary["data"]["test"]["label_flip_rate"] == 0
    for name in ("report.md", "accuracy_vs_u.png", "training_curves.png", "samples.png", "summary.json",
                 "shards/train/index.json", "shards/test/index.json", "benchmark/test.json", "eval/report.md"):
        assert (tmp_path / name).is_file(), name
    assert "| DiNa-LRM (Thurstone) |" in (tmp_path / "report.md").read_text()
    assert "[eval/report.md](eval/report.md)" in (tmp_path / "report.md").read_text()
    assert 0 <= summary["benchmark_eval"]["settings"]["DiNa-LRM u=0.4"]["accuracy"] <= 1
    search = summary["search"]["rows"]
    assert len(summary["search"]["prompts"]) == 1 and "## Reward-guided sampling" in (tmp_path / "report.md").read_text()
    assert all(0 <= v <= 1 for row in search.values() for v in row["judge"])
    assert search["best-of-16, judge (ceiling)"]["judge"] >= search["plain sampling"]["judge"]  # per prompt: the judge picks its best
    assert search["prune-and-continue n=16 keep=4 at 0.8, DiNa-LRM"]["gflops"] < search["best-of-16, DiNa-LRM (clean, u=0.4)"]["gflops"]
    assert all(h[-1]["step"] == 2 for name, h in summary["histories"].items() if name != PIXEL_METHOD)
    assert [h["step"] for h in summary["histories"]["DiNa-LRM (Thurstone)"] if "heldout_accuracy" in h] == [0, 1, 2]
    assert 1 <= summary["histories"][PIXEL_METHOD][-1]["step"] < 2  # its step costs more FLOPs than DiNa-LRM's
    scorer = Scorer.from_pretrained(tmp_path / "reward_model", SHIPPED_GENERATOR, max_sequence_length=T5_TOKENS)
    latents = torch.zeros(1, 4, 16, 16)
    assert torch.isfinite(scorer.score("a red circle", latents=latents, seed=0).raw).all()


def test_pretrain_is_deterministic_and_loadable(tmp_path):
    config = PretrainConfig(vae_steps=2, dataset_size=64, generator_steps=2, warmup_steps=1, generator=SMALL)
    first, second = pretrain(tmp_path / "a", config), pretrain(tmp_path / "b", config)
    for name, value in first.transformer.state_dict().items():
        torch.testing.assert_close(value, second.transformer.state_dict()[name], rtol=0, atol=0)
    loaded = load_pipeline(tmp_path / "a")
    torch.testing.assert_close(loaded.vae.decoder.conv_out.weight, first.vae.decoder.conv_out.weight)
    assert loaded.vae.config.scaling_factor == first.vae.config.scaling_factor != 1.0
    record = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert record["config"]["generator_steps"] == 2 and record["generator_final_loss"] > 0


def test_pretraining_continues_from_a_saved_generator(tmp_path):
    """``generator_from``: the saved pipeline is the starting point; its VAE is kept, the transformer trains on."""
    config = PretrainConfig(vae_steps=2, dataset_size=64, generator_steps=2, warmup_steps=1, generator=SMALL)
    start = pretrain(tmp_path / "start", config)
    continued = pretrain(tmp_path / "continued", PretrainConfig(dataset_size=64, generator_steps=2, warmup_steps=1, generator=SMALL,
                                                                generator_from=str(tmp_path / "start"), seed=1))
    torch.testing.assert_close(continued.vae.decoder.conv_out.weight, start.vae.decoder.conv_out.weight, rtol=0, atol=0)
    assert continued.vae.config.scaling_factor == start.vae.config.scaling_factor
    moved = [name for name, value in continued.transformer.state_dict().items() if not torch.equal(value, start.transformer.state_dict()[name])]
    assert moved  # it trained on from the saved weights
    assert json.loads((tmp_path / "continued" / "pretrain.json").read_text())["config"]["generator_from"] == str(tmp_path / "start")


def test_pretrain_command(tmp_path):
    out = tmp_path / "generator"
    assert main(["toyworld", "pretrain", "--out", str(out), "--vae-steps", "1", "--generator-steps", "1",
                 "--dataset-size", "32"]) == 0
    assert load_pipeline(out).transformer.config.num_layers == 4
