"""The evaluation protocol on hand-computed cases, bootstrap determinism, settings and analytic FLOPs."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import make_latents, tiny_config
from dina_lrm import DiNaLRM
from dina_lrm.data.records import PreferenceGroup, ReadReport
from dina_lrm.eval.cost import scoring_flops
from dina_lrm.eval.protocol import Census, PairIndex, accuracy_summary, calibration
from dina_lrm.rewards import DiNaReward, Setting
from dina_lrm.eval.runner import make_batches, without_images
from dina_lrm.scorer import Scorer


def group(gid, ranks):
    return PreferenceGroup(gid, f"prompt {gid}", [f"{gid}/{i}.png" for i in range(len(ranks))], ranks)


def test_pairs_leave_out_human_ties_and_model_ties_count_half():
    groups = [group("a", [1, 2, 2]), group("b", [2, 1]), group("c", [1, 2, 3, 3])]
    pairs = PairIndex.of(groups)
    # a: (0,1) (0,2); b: (1,0); c: (0,1) (0,2) (0,3) (1,2) (1,3) -- flat offsets 0, 3, 5
    assert pairs.preferred.tolist() == [0, 0, 4, 5, 5, 5, 6, 6]
    assert pairs.other.tolist() == [1, 2, 3, 6, 7, 8, 7, 8]
    scores = [3.0, 1.0, 3.0,   0.0, 0.0,   4.0, 2.0, 3.0, 1.0]
    wins = pairs.wins(scores)
    # a: 3>1 right, 3=3 half; b: tie half; c: 4>3 right, 4>1, 4>... right x3, 2<3 wrong, 2>1 right
    assert wins.tolist() == [1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0, 1.0]
    summary = accuracy_summary(wins, pairs.group_ids, resamples=200, seed=0)
    assert summary["accuracy"] == pytest.approx(6.0 / 8)
    assert summary["pairs"] == 8 and summary["prompts"] == 3


def test_census_counts_ties_all_tied_prompts_and_one_image_rows():
    groups = [group("a", [1, 2, 2]), group("t", [1, 1, 1])]
    report = ReadReport(rows=3)
    report.reject("fewer than two images")
    census = Census.of(groups, report)
    assert (census.prompts, census.images, census.pairs) == (1, 3, 2)
    assert census.tied_pairs == 1 + 3
    assert census.all_tied_prompts == 1
    assert census.invalid_rows == {"fewer than two images": 1}


def test_nan_scores_are_refused():
    with pytest.raises(FloatingPointError):
        PairIndex.of([group("a", [1, 2])]).wins([0.1, float("nan")])


def test_bootstrap_is_deterministic_and_resamples_prompts():
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 2, 300).astype(float)
    groups = [str(i // 6) for i in range(300)]
    first = accuracy_summary(wins, groups, resamples=500, seed=3)
    assert accuracy_summary(wins, groups, resamples=500, seed=3) == first
    assert accuracy_summary(wins, groups, resamples=500, seed=4)["ci"] != first["ci"]
    assert first["ci"][0] < first["accuracy"] < first["ci"][1]
    # one prompt holding every pair: resampling prompts cannot move the accuracy
    single = accuracy_summary(wins, ["x"] * 300, resamples=100, seed=0)
    assert single["ci"] == [pytest.approx(single["accuracy"])] * 2


def test_calibration_orients_pairs_to_the_models_favourite():
    result = calibration(np.array([0.9, 0.95, 0.2, 0.4, 0.5]), bins=5)
    # confidences 0.9, 0.95, 0.8, 0.6, 0.5; agreement 1, 1, 0, 0, 0.5
    by_low = {round(b["low"], 1): b for b in result["bins"]}
    assert by_low[0.9]["pairs"] == 2 and by_low[0.9]["agreement"] == 1.0
    assert by_low[0.8]["agreement"] == 0.0 and by_low[0.6]["agreement"] == 0.0 and by_low[0.5]["agreement"] == 0.5
    expected = (abs(1 - 0.9) + abs(1 - 0.95) + 0.8 + 0.6 + 0.0) / 5
    assert result["ece"] == pytest.approx(expected)


def test_batches_hold_whole_groups_in_order_and_missing_images_drop_cleanly():
    groups = [group(str(i), [1, 2, 3]) for i in range(5)]
    assert make_batches(groups, 4) == [[0, 1], [2, 3], [4]]
    kept = without_images(groups[:2], {("0", "0/0.png"), ("1", "1/0.png"), ("1", "1/1.png")})
    assert [g.group_id for g in kept] == ["0"] and kept[0].ranks == [2, 3]


def test_setting_names_and_validation():
    assert Setting((0.4,)).name == "u=0.4"
    assert Setting((0.4,), 4).name == "u=0.4 x4 draws"
    assert Setting((0.2, 0.6)).name == "levels 0.2+0.6"
    with pytest.raises(ValueError):
        Setting((1.5,))
    with pytest.raises(ValueError):
        Setting((0.4,), 0)


@pytest.fixture
def scorer(pipe):
    torch.manual_seed(0)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    return Scorer.from_model(model, pipe, max_sequence_length=16)


def test_the_dina_reward_matches_the_scorer_for_each_setting_and_shape(scorer):
    latents = list(make_latents(3, seed=1)) + list(make_latents(2, size=16, seed=2))
    prompts = ["a red circle", "two blue squares", "a cat", "a dog", "a green triangle"]
    for setting in (Setting((0.3,)), Setting((0.4,), 3), Setting((0.2, 0.6))):
        scores = DiNaReward(scorer, setting)(latents, prompts, seed=7).tolist()
        small = scorer.score(prompts[:3], latents=torch.stack(latents[:3]), noise_levels=list(setting.levels), n_draws=setting.draws, seed=7 * 1009)
        large = scorer.score(prompts[3:], latents=torch.stack(latents[3:]), noise_levels=list(setting.levels), n_draws=setting.draws, seed=7 * 1009 + 1)
        assert scores == pytest.approx(small.raw.tolist() + large.raw.tolist(), abs=1e-6)
    assert not torch.equal(DiNaReward(scorer, Setting((0.3,)))(latents, prompts, seed=7), DiNaReward(scorer, Setting((0.3,)))(latents, prompts, seed=8))


@pytest.mark.parametrize("levels,draws", [((0.5,), 1), ((0.2, 0.5, 0.8), 2)])
def test_analytic_flops_equal_torch_flop_counter(scorer, levels, draws):
    model = scorer.model
    shape = (4, 16, 8)
    states, pooled = torch.randn(draws, 20, 32), torch.randn(draws, 64)
    latents = torch.randn(len(levels), draws, *shape)
    # the math attention kernel, so the counter sees attention as matrix products
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_ensemble(latents, states, pooled, torch.full((len(levels),), 500.0))
    assert scoring_flops(model, shape, 20, Setting(levels, draws)) == counter.get_total_flops()
