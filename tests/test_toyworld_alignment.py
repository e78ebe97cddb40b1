"""The toy world's rewards as plug-ins, the biased base and its recipe, the ground-truth render shards,
and the alignment experiment end to end at a tiny size."""

import ast
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dina_lrm.cli import main
from dina_lrm.data.shards import load_preference_shards
from dina_lrm.pipelines import load_pipeline
from dina_lrm_toyworld.alignment import (
    BASES,
    biased_base_recipe,
    materialise_base,
    run_alignment_experiment,
    write_prompt_sets,
    write_render_shards,
)
from dina_lrm_toyworld.alignment_report import efficiency
from dina_lrm_toyworld.config import RUNS, PreferenceDataConfig, ToyAlignmentConfig
from dina_lrm_toyworld.demo import SHIPPED_GENERATOR
from dina_lrm_toyworld.generator import decode_latents
from dina_lrm_toyworld.judge import Judge
from dina_lrm_toyworld.pixel_reward import PixelReward
from dina_lrm_toyworld.pretrain import pretrain, render_training_images
from dina_lrm_toyworld.rewards import judge, judge_scores, load_pixel_reward, pixel_reward, save_pixel_reward
from dina_lrm_toyworld.scenes import CONFUSIONS, parse_prompt, render, scene_for, with_object

SRC = Path(__file__).parents[1] / "src" / "dina_lrm"


def test_the_library_never_imports_the_toy_world():
    """The toy world plugs in as a user's code does: only it and the command line may import it."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "toyworld" or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dina_lrm_toyworld"):
                offenders.append(f"{path.relative_to(SRC)}: {node.module}")
    assert not offenders, offenders


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


def test_judge_scores_equal_the_judge_on_uint8_images():
    prompt = "two red circles"
    image = render(scene_for(parse_prompt(prompt), np.random.default_rng(0)))
    assert judge_scores(as_batch(image), [prompt]).item() == Judge()(image, prompt).score


def test_judge_factory_reports_clause_rates():
    prompt = "a red circle to the left of a blue square"
    scene = scene_for(parse_prompt(prompt), np.random.default_rng(0))
    swapped = with_object(with_object(scene, 0, x=scene.objects[1].x), 1, x=scene.objects[0].x)  # relation broken
    images = torch.cat([as_batch(render(scene)), as_batch(render(swapped))])
    scores, info = judge("cpu")(images, [prompt, prompt])
    assert scores[0] == pytest.approx(1.0) and scores[1] < scores[0]
    assert info["relation"].tolist() == [1.0, 0.0]
    for kind in ("object", "colour", "count", "no_extra"):
        assert info[kind].tolist() == [1.0, 1.0]
    assert np.isnan(info["size"]).all()  # the prompt names no size
    assert info["alignment"][1] == pytest.approx(5 / 6)  # counts and shapes of both, no others: 5 of 6 clauses hold


def test_pixel_reward_round_trip_and_factory_gradients(tmp_path):
    torch.manual_seed(0)
    model = PixelReward(128, 128).eval()
    path = save_pixel_reward(model, tmp_path / "pixel.safetensors")
    loaded = load_pixel_reward(path)
    pixels, states, pooled = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 5, 128), torch.randn(2, 128)
    torch.testing.assert_close(loaded(pixels, states, pooled), model(pixels, states, pooled))
    fn = pixel_reward(path, SHIPPED_GENERATOR)("cpu")
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores, _ = fn(images, ["a red circle", "two blue squares"])
    scores.sum().backward()
    assert scores.shape == (2,) and images.grad.abs().sum() > 0


def test_prompt_sets_are_disjoint(tmp_path):
    config = ToyAlignmentConfig(train_prompts=40, num_val_prompts=8, num_test_prompts=16)
    paths = write_prompt_sets(tmp_path, config)
    sets = {name: path.read_text().split("\n")[:-1] for name, path in paths.items()}
    assert [len(sets[n]) for n in ("train", "val", "test")] == [40, 8, 16]
    assert not (set(sets["train"]) & set(sets["val"]) or set(sets["train"]) & set(sets["test"]) or set(sets["val"]) & set(sets["test"]))


@pytest.mark.parametrize("base", ["biased", "early"])
def test_the_base_is_the_shipped_checkpoint_in_the_shipped_latent_space(tmp_path, base):
    pipe = load_pipeline(materialise_base(tmp_path, base))
    shipped = load_pipeline(SHIPPED_GENERATOR)
    checkpoint = load_file(str(BASES[base] / "transformer" / "diffusion_pytorch_model.safetensors"))
    name = "transformer_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(pipe.transformer.state_dict()[name], checkpoint[name].float())
    assert not torch.equal(pipe.transformer.state_dict()[name], shipped.transformer.state_dict()[name])
    for key, value in shipped.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="neither one of"):
        materialise_base(tmp_path, "nowhere")


def test_confused_renders_swap_colours_at_the_rate_under_the_unchanged_caption():
    prompts, images = render_training_images(300, np.random.default_rng(0), confusion_rate=0.5)
    results = Judge().batch(list(images), prompts)
    swapped = [CONFUSIONS[g.colour] in {o.colour for o in r.objects} and g.colour not in {o.colour for o in r.objects}
               for r, p in zip(results, prompts) for g in parse_prompt(p).groups[:1]]
    assert 0.4 < np.mean(swapped) < 0.6
    clean_prompts, clean = render_training_images(50, np.random.default_rng(0))
    assert np.mean([r.alignment for r in Judge().batch(list(clean), clean_prompts)]) > 0.9


def test_the_biased_base_recipe_continues_the_shipped_generator(tmp_path):
    """The recipe of the shipped pretrained_biased, at two steps: the text encoders stay the shipped ones."""
    recipe = biased_base_recipe(generator_steps=2, dataset_size=8, generator_batch=4, save_dtype="float32")
    assert recipe.generator_from == str(SHIPPED_GENERATOR) and recipe.confusion_rate == 0.5 and not recipe.train_text_encoders
    pipe = pretrain(tmp_path / "biased", recipe)
    shipped = load_pipeline(SHIPPED_GENERATOR)
    for key, value in shipped.text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[key], value)
    assert any(not torch.equal(pipe.transformer.state_dict()[k], v) for k, v in shipped.transformer.state_dict().items())
    record = json.loads((BASES["biased"] / "pretrain.json").read_text())["config"]
    assert {k: record[k] for k in ("confusion_rate", "generator_steps", "generator_lr", "train_text_encoders", "seed")} == {
        "confusion_rate": 0.5, "generator_steps": 400, "generator_lr": 2e-4, "train_text_encoders": False, "seed": 7}


def test_render_shards_hold_ground_truth_renders_of_the_prompts(tmp_path):
    vae = load_pipeline(SHIPPED_GENERATOR).vae
    prompts = ["a red circle", "three green triangles"]
    write_render_shards(tmp_path / "renders", vae, prompts, per_prompt=2)
    pairs = load_preference_shards(tmp_path / "renders")
    assert pairs.prompts == [p for p in prompts for _ in range(2)]
    chosen = Judge().batch(list(decode_latents(vae, pairs.chosen)), pairs.prompts)
    rejected = Judge().batch(list(decode_latents(vae, pairs.rejected)), pairs.prompts)
    assert np.mean([r.alignment for r in chosen]) > np.mean([r.alignment for r in rejected])


def test_experiment_writes_its_report_for_every_run(tmp_path):
    tiny = {"max_steps": 2, "prompts_per_step": 2, "train_sampling_steps": 4, "eval_every": 1}
    config = ToyAlignmentConfig(
        seeds=[0], data=PreferenceDataConfig(train_prompts=6, test_prompts=4, samples_per_prompt=2, corruptions_per_prompt=1),
        reward_steps=2, pixel_reward_steps=2, reward_batch_size=4, train_prompts=8, num_val_prompts=2, num_test_prompts=3, renders_per_prompt=1, workers=1,
        runs=list(RUNS), eval_sampling_steps=4,
        settings={"refl": {**tiny, "refl": {"stop_range": [2, 4]}},
                  "nft": {**tiny, "nft": {"group_size": 2, "updates_per_step": 2}},
                  "sft": {**tiny, "sft": {"batch_size": 4, "updates_per_step": 2}},
                  "grpo": {**tiny, "max_steps": 1, "grpo": {"group_size": 2, "sde_window_size": 2, "sde_window_range": [0, 3]}}},
    )
    result = run_alignment_experiment(tmp_path, config)
    assert set(result["runs"]) == set(RUNS)
    for name, run in result["runs"].items():
        assert len(run["test_gain_per_seed"]) == 1
        assert run["test_gain_ci"][0] <= run["test_gain"] <= run["test_gain_ci"][1]
        assert 0 <= run["test_judge_base"] <= 1 and "relation" in run["clauses"]
    assert result["runs"]["NFT + DiNa-LRM"]["reward_ms_per_sample"] > 0
    assert abs(result["runs"]["NFT + constant reward"]["test_final_gain"]) < 1e-6  # r = 1/2 everywhere: the policy does not move
    bases = {run["test_judge_base"] for run in result["runs"].values()}
    assert len(bases) == 1  # every run of a seed starts from the same base, scored on the same test prompts
    flops = result["flops"]
    assert flops["dina"]["reward_forward"] < flops["pixel"]["reward_forward"] and flops["dina"]["sampling"] == flops["pixel"]["sampling"]
    table = (tmp_path / "alignment.md").read_text()
    assert all(name in table for name in RUNS) and "The gate of the base" in table
    assert (tmp_path / "alignment.png").stat().st_size > 10_000 and (tmp_path / "alignment_clauses.png").is_file()
    assert (tmp_path / "samples_nft_dina-lrm_best.png").is_file()
    saved = json.loads((tmp_path / "alignment.json").read_text())
    assert saved["runs"]["NFT + judge"]["test_gain"] == result["runs"]["NFT + judge"]["test_gain"]
    with pytest.raises(FileExistsError, match="earlier alignment experiment"):
        run_alignment_experiment(tmp_path, config)
    reused = ToyAlignmentConfig(**{**config.__dict__, "runs": ["NFT + judge"], "rewards_from": str(tmp_path)})
    (tmp_path / "reused.yaml").write_text(yaml.safe_dump({**asdict(config), "runs": list(RUNS)}))
    assert main(["toyworld", "align", "--out", str(tmp_path / "again"), "--config", str(tmp_path / "reused.yaml"), "--runs", "NFT + judge",
                 "--rewards-from", str(tmp_path)]) == 0  # the command: the file, then the flags
    again = json.loads((tmp_path / "again" / "alignment.json").read_text())
    assert list(again["runs"]) == ["NFT + judge"]
    assert again["runs"]["NFT + judge"]["test_gain"] == result["runs"]["NFT + judge"]["test_gain"]  # seeded: the same again
    with pytest.raises(ValueError, match="not early"):
        run_alignment_experiment(tmp_path / "other", ToyAlignmentConfig(**{**reused.__dict__, "base": "early"}))


def test_efficiency_finds_where_dina_reaches_the_pixel_rewards_best_gain():
    def history(gains, seconds_per_step):
        return [{"step": 5 * i, "eval_judge": 0.5 + g, "train_cpu_seconds": 5 * i * seconds_per_step} for i, g in enumerate(gains)]

    pixel = [history([0.0, 0.02, 0.06, 0.01], 2.0), history([0.0, 0.04, 0.04, 0.03], 2.0)]  # mean best +0.05 at step 10, 20 CPU-s
    dina = [history([0.0, 0.05, 0.08, 0.0], 1.0), history([0.0, 0.03, 0.04, 0.0], 1.0)]  # mean 0.04 at step 5, 0.06 at step 10
    found = efficiency({"ReFL + pixel reward": pixel, "ReFL + DiNa-LRM": dina}, "ReFL", at="best")
    assert found["pixel_best_gain"] == pytest.approx(0.05) and found["pixel_cpu_seconds"] == 20
    assert found["dina_step_to_reach"] == 10 and found["ratio"] == pytest.approx(10 / 20)
    falling = [history([0.0, -0.01, -0.2, -0.3], 2.0)]
    assert efficiency({"ReFL + pixel reward": falling, "ReFL + DiNa-LRM": dina}, "ReFL", at="best")["ratio"] is None
    final = efficiency({"ReFL + pixel reward": pixel, "ReFL + DiNa-LRM": dina}, "ReFL")  # the pixel reward's last evaluation: +0.02
    assert final["pixel_best_gain"] == pytest.approx(0.02) and final["dina_step_to_reach"] == 5
    assert efficiency({"ReFL + DiNa-LRM": dina}, "ReFL") is None


def test_the_toy_world_commands_run_through_the_cli_entry_points(tmp_path, capsys):
    """`dina-lrm toyworld bias` and `toyworld benchmark` at tiny size, dispatched through the entry point
    the toy world registers (the demo, align and ablations commands run their tiny tests elsewhere)."""
    from dina_lrm.cli import main

    tiny = ["--set", "generator_steps=2", "--set", "dataset_size=8", "--set", "generator_batch=4", "--set", "save_dtype=float32"]
    assert main(["toyworld", "bias", "--out", str(tmp_path / "biased"), *tiny]) == 0
    assert load_pipeline(tmp_path / "biased").transformer is not None
    assert main(["toyworld", "benchmark", "--out", str(tmp_path / "bench"), "--prompts", "2", "--images-per-prompt", "2"]) == 0
    rows = json.loads((tmp_path / "bench" / "test.json").read_text())
    assert len(rows) == 2 and all(len(row["image_path"]) == 2 for row in rows)
    assert "Wrote the biased toy generator" in capsys.readouterr().out
