import dataclasses
import json

import numpy as np
import pytest
import torch

from dina_lrm.config import config_differences
from dina_lrm_toyworld.ablations import dina_config, run_ablations
from dina_lrm.cli import main
from dina_lrm_toyworld.config import ROW_BY_NAME, ROWS, AblationConfig, PreferenceDataConfig, Variant
from dina_lrm_toyworld.lrm_baseline import PooledCosineLRM

# the release-config keys each setting of a Variant may change
CONFIG_KEYS = {
    "loss": {"model.model_type"},
    "train_u": {"training.t_weighting_scheme"},
    "backbone": {"model.use_lora", "model.freeze_backbone"},
}


def test_every_row_differs_from_its_reference_in_exactly_one_setting():
    assert ROWS[0].variant == Variant() and ROWS[0].reference is None
    for row in ROWS[1:]:
        reference = ROW_BY_NAME[row.reference].variant
        (setting,) = row.variant.differences(reference)
        if setting in CONFIG_KEYS:
            changed = {d.split(":")[0].strip() for d in config_differences(dina_config(reference), dina_config(row.variant))}
            assert changed and changed <= CONFIG_KEYS[setting], (row.name, changed)
    assert ROW_BY_NAME["clean only (u = 0)"].reference == "DiNa-LRM (full)"
    assert dina_config(Variant(train_u="zero")).training.t_weighting_scheme == "constant"
    assert dina_config(Variant(backbone="frozen")).model.backbone_mode == "frozen"
    assert dina_config(Variant(backbone="full")).model.backbone_mode == "full"


def test_lrm_baseline_scores_are_cosines_of_pooled_features(pipe, text_inputs):
    torch.manual_seed(0)
    config = dina_config(Variant(reward="lrm", loss="bt"))
    config.model.num_transformer_layers, config.model.visual_head_idx, config.model.text_head_idx = 2, [1, 2], [1, 2]
    model = PooledCosineLRM(config, pipe.transformer).eval()
    states, pooled = text_inputs
    latents = torch.randn(2, 4, 8, 8) * 3
    timesteps = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        scores = model(latents, states, pooled, timesteps)[:, 0]
        features = model.features(latents, states, pooled, timesteps).visual[-1]
        head = model.reward_head
        expected = torch.nn.functional.cosine_similarity(head.visual(features.mean(1)), head.text(pooled), dim=-1)
    assert scores.shape == (2,) and (scores.abs() <= 1).all()
    torch.testing.assert_close(scores, expected)


@pytest.fixture(scope="module")
def tiny_ablations(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    config = AblationConfig(
        data=PreferenceDataConfig(train_prompts=8, test_prompts=4, samples_per_prompt=3, corruptions_per_prompt=2, sampling_steps=3),
        steps=2, seeds=[0], workers=1, benchmark_prompts=2, resamples=50, u_grid=(0.3, 0.6),
    )  # every row of the table, through the command and its generated flags
    flags = ["--data.train_prompts", "8", "--data.test_prompts", "4", "--data.samples_per_prompt", "3", "--data.corruptions_per_prompt", "2",
             "--data.sampling_steps", "3", "--steps", "2", "--seeds", "0", "--workers", "1", "--benchmark-prompts", "2",
             "--resamples", "50", "--u-grid", "0.3", "0.6"]
    assert main(["toyworld", "ablations", "--out", str(out), *flags]) == 0
    return out, config, json.loads((out / "ablations.json").read_text())


def test_the_table_is_recomputed_from_the_saved_per_pair_credits(tiny_ablations):
    out, config, summary = tiny_ablations
    saved = json.loads((out / "ablations.json").read_text())
    credits = np.load(out / "credits.npz")
    assert list(saved["table"]) == [row.name for row in ROWS]  # every row ran end to end
    sources = np.array(saved["data"]["heldout"]["sources"])
    for name, row in saved["table"].items():
        key = next(r["training"] for r in saved["rows"] if r["name"] == name)
        per_setting = {s: np.mean([credits[f"{key}/seed{seed}/heldout/{s}"] for seed in config.seeds], axis=0) for s in
                       (["pixels"] if "pixel" in name else ["ensemble"] if "ensemble" in name else ["0.3", "0.6"])}
        best = max(per_setting, key=lambda s: per_setting[s].mean())
        assert row["best"] == best
        assert row["heldout"]["accuracy"] == pytest.approx(per_setting[best].mean())
        assert row["generated"]["accuracy"] == pytest.approx(per_setting[best][sources == "generated"].mean())
        low, high = row["heldout"]["ci"]
        assert low <= row["heldout"]["accuracy"] <= high
        benchmark = np.mean([credits[f"{key}/seed{seed}/benchmark/{best}"] for seed in config.seeds], axis=0)
        assert row["benchmark"]["accuracy"] == pytest.approx(benchmark.mean())
        clauses = saved["data"]["heldout"]["clauses"]
        for kind, entry in row["clauses"].items():
            index = [i for i, c in enumerate(clauses) if (kind in c if kind != "quality only" else not c)]
            assert entry["pairs"] == len(index)
            if index:
                assert entry["accuracy"] == pytest.approx(per_setting[best][index].mean())
        gaps = np.array(saved["data"]["heldout"]["gaps"])
        assert (gaps > 0).mean() > 0.9 and sum(entry["pairs"] for entry in row["by_gap"].values()) == len(gaps)
        small = row["by_gap"]["gap < 0.1"]
        if small["pairs"]:
            assert small["accuracy"] == pytest.approx(per_setting[best][gaps < 0.1].mean())
    assert saved["table"]["pixel reward (decodes), equal FLOPs"]["steps"] < config.steps  # same FLOPs, dearer steps
    assert saved["table"]["ensemble {0.2,0.5,0.7}, calibrated"]["gflops_per_image"] == pytest.approx(
        3 * saved["table"]["DiNa-LRM (full)"]["gflops_per_image"], rel=0.05)
    for name in ("ablations.md", "ablations_accuracy_vs_u.png", "ablations_clauses.png"):
        assert (out / name).is_file()
    assert "| DiNa-LRM (full) |" in (out / "ablations.md").read_text()


@pytest.mark.slow
def test_ablations_do_not_depend_on_how_runs_are_spread_and_never_overwrite(tiny_ablations, tmp_path):
    out, config, summary = tiny_ablations
    config = dataclasses.replace(config, workers=2, rows=config.rows[:1])
    run_ablations(tmp_path / "again", config)
    again = json.loads((tmp_path / "again" / "ablations.json").read_text())
    first, second = np.load(out / "credits.npz"), np.load(tmp_path / "again" / "credits.npz")
    for key in second.files:
        np.testing.assert_array_equal(first[key], second[key])
    assert again["table"]["DiNa-LRM (full)"]["heldout"] == summary["table"]["DiNa-LRM (full)"]["heldout"]
    with pytest.raises(FileExistsError, match="earlier ablations"):
        run_ablations(out, config)


def test_ablation_config_refuses_unknown_rows():
    with pytest.raises(ValueError, match="unknown ablation rows"):
        AblationConfig(rows=["DiNa-LRM (full)", "no such row"]).validate()


def test_ablations_command_refuses_unknown_rows_in_one_line(tmp_path, capsys):
    assert main(["toyworld", "ablations", "--out", str(tmp_path / "a"), "--rows", "no such row"]) == 2
    error = capsys.readouterr().err.strip()
    assert "unknown ablation rows ['no such row']" in error and "\n" not in error
    assert not (tmp_path / "a").exists()
