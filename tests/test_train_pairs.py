import time

import pytest
import torch
from helpers import tiny_config

from dina_lrm import DiNaLRM
from dina_lrm.data.shards import PairTable
from dina_lrm.eval.pairwise import pairwise_accuracy
from dina_lrm.models.sd3_text import SD3PromptEncoder
from dina_lrm.noise import NoiseSampler, SigmaTable
from dina_lrm.scorer import Scorer
from dina_lrm_toyworld.pixel_reward import PixelReward, pixel_preference_step
from dina_lrm_toyworld.pairs import FitConfig, PairBatches, fit_pairs
from dina_lrm.train.step import preference_step


def brightness_pairs(count: int, seed: int) -> PairTable:
    """The preferred latent is the other one plus a constant: a rule any working learner picks up."""
    generator = torch.Generator().manual_seed(seed)
    rejected = torch.randn(count, 4, 8, 8, generator=generator)
    prompts = [["a red circle", "two blue squares"][i % 2] for i in range(count)]
    return PairTable(prompts, rejected + 1.5, rejected, torch.ones(count), ["generated"] * count, prompts)


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 0.0])) == pytest.approx(0.625)
    with pytest.raises(FloatingPointError):
        pairwise_accuracy(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(ValueError):
        pairwise_accuracy(torch.tensor([]), torch.tensor([]))


@pytest.mark.slow  # the demo and ablation tests run fit_pairs end to end in CI
def test_fit_pairs_learns_a_preference_rule(pipe):
    torch.manual_seed(0)
    encoder = SD3PromptEncoder.from_pipeline(pipe)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    table, sampler = SigmaTable.from_scheduler(pipe.scheduler), NoiseSampler("uniform")
    held_out = brightness_pairs(64, seed=1)
    scorer = Scorer(model, encoder, table)

    def evaluate():
        model.eval()
        chosen = scorer.score(held_out.prompts, latents=held_out.chosen, u=0.3, seed=0).raw
        accuracy = pairwise_accuracy(chosen, scorer.score(held_out.prompts, latents=held_out.rejected, u=0.3, seed=1).raw)
        model.train()
        return {"heldout_accuracy": accuracy}

    batches = PairBatches(brightness_pairs(128, seed=0), encoder, batch_size=16, seed=0)
    history = fit_pairs(lambda b, g: preference_step(model, b, table, sampler, generator=g), model.parameters(), batches,
                        FitConfig(learning_rate=2e-3, max_steps=40), evaluate=evaluate)
    evals = [h for h in history if "heldout_accuracy" in h]
    assert [h["step"] for h in evals] == [0, 40]  # before training and at the end
    assert evals[0]["heldout_accuracy"] < 0.7 and evals[-1]["heldout_accuracy"] >= 0.9
    assert [h["step"] for h in history if "loss" in h] == [10, 20, 30, 40]


def test_fit_pairs_runs_its_steps_reports_seconds_and_refuses_bad_setups(pipe):
    encoder = SD3PromptEncoder.from_pipeline(pipe)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    table, sampler = SigmaTable.from_scheduler(pipe.scheduler), NoiseSampler("uniform")
    batches = PairBatches(brightness_pairs(32, seed=0), encoder, batch_size=8, seed=0)
    step = lambda b, g: preference_step(model, b, table, sampler, generator=g)
    history = fit_pairs(step, model.parameters(), batches, FitConfig(max_steps=3, log_every=2))
    assert [h["step"] for h in history] == [2, 3]  # one log row, then the final row
    assert history[-1]["seconds"] > history[0]["seconds"] > 0
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_pairs(step, [torch.nn.Parameter(torch.zeros(1), requires_grad=False)], batches, FitConfig(max_steps=1))
    next(model.reward_head.parameters()).data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        fit_pairs(step, model.parameters(), batches, FitConfig(max_steps=2))
    with pytest.raises(ValueError, match="no preference pairs"):
        PairBatches(brightness_pairs(0, seed=0), encoder, batch_size=8, seed=0)


def test_pixel_reward_decodes_and_trains_only_itself(pipe):
    encoder = SD3PromptEncoder.from_pipeline(pipe)
    batches = PairBatches(brightness_pairs(8, seed=0), encoder, batch_size=4, seed=0)
    batch = next(iter(batches))
    model = PixelReward(text_width=batch.encoder_hidden_states.shape[-1], pooled_width=batch.pooled_projections.shape[-1])
    out = pixel_preference_step(model, pipe.vae, batch)
    assert out.chosen_scores.shape == (4,) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_bootstrap_interval_resamples_prompts_and_is_reproducible():
    from dina_lrm.eval.pairwise import bootstrap_interval

    wins = [1, 1, 1, 1, 0, 0, 1, 0.5]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    low, high = bootstrap_interval(wins, groups, resamples=2000, seed=3)
    assert (low, high) == bootstrap_interval(wins, groups, resamples=2000, seed=3)
    assert 0 <= low < sum(wins) / len(wins) < high <= 1
    narrow = bootstrap_interval(wins * 50, [f"{g}{i // 8}" for i, g in enumerate(groups * 50)], resamples=2000, seed=3)
    assert high - low > 2 * (narrow[1] - narrow[0])  # 50x the prompts: a much tighter interval
    assert bootstrap_interval([1, 1, 1], ["x", "y", "z"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="one group per pair"):
        bootstrap_interval([1, 0], ["a"])


def test_a_slow_machine_trains_the_same_model(pipeline_dir):
    """The budget is steps, not seconds: a step that takes longer (a busy machine) changes nothing."""
    from dina_lrm.pipelines import load_pipeline

    def train(delay: float) -> tuple[list[dict], dict]:
        pipe = load_pipeline(pipeline_dir)
        torch.manual_seed(0)
        model = DiNaLRM(tiny_config(), pipe.transformer)
        table, sampler = SigmaTable.from_scheduler(pipe.scheduler), NoiseSampler("uniform")
        batches = PairBatches(brightness_pairs(32, seed=0), SD3PromptEncoder.from_pipeline(pipe), batch_size=8, seed=0)

        def step(batch, generator):
            time.sleep(delay)
            return preference_step(model, batch, table, sampler, generator=generator)

        history = fit_pairs(step, model.parameters(), batches, FitConfig(max_steps=6, log_every=3))
        return history, {k: v.clone() for k, v in model.state_dict().items() if "lora" in k or "reward_head" in k}

    (idle_history, idle), (busy_history, busy) = train(0.0), train(0.05)
    assert [h["step"] for h in busy_history] == [h["step"] for h in idle_history] == [3, 6, 6]
    assert busy_history[-1]["seconds"] > idle_history[-1]["seconds"]
    assert [h.get("loss") for h in busy_history] == [h.get("loss") for h in idle_history]
    for name, value in idle.items():
        torch.testing.assert_close(busy[name], value, rtol=0, atol=0)
