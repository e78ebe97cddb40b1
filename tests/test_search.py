"""Reward-guided sampling on the shipped toy generator and reward: selection, cost, seeds, bad input."""

import pytest
import torch

from dina_lrm import Scorer
from dina_lrm.pipelines import load_pipeline
from dina_lrm.search import Searcher, SearchConfig
from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD
from dina_lrm_toyworld.generator import T5_TOKENS

PROMPT = "two red circles"


@pytest.fixture(scope="module")
def toy():
    pipe = load_pipeline(SHIPPED_GENERATOR)
    return pipe, Searcher.from_pretrained(SHIPPED_REWARD, pipe, config()).scorer


def config(**overrides) -> SearchConfig:
    return SearchConfig(**{"strategy": "prune", "n": 6, "keep": 2, "at": [0.6, 0.3], "steps": 8, "guidance_scale": 4.0,
                           "max_sequence_length": T5_TOKENS, "seed": 3, **overrides})


class Recorder:
    """A final reward that remembers what it scored and prefers latents near ``target``."""

    differentiable, name, details = False, "recorder", {}

    def __init__(self, target=None):
        self.target, self.seen = target, None

    def __call__(self, latents, prompts, seed):
        self.seen = latents.clone()
        if self.target is None:
            return torch.zeros(len(latents))
        return -(latents - self.target).flatten(1).norm(dim=1)


def test_the_strategy_returns_the_candidate_a_reward_prefers(toy):
    pipe, scorer = toy
    everything = Recorder()
    searcher = Searcher(pipe, scorer, config(keep=6), everything)  # nothing pruned: every candidate's path is recorded
    at_checkpoints = {}
    noisy = searcher.noisy_scores
    searcher.noisy_scores = lambda x, prompt, step: at_checkpoints.setdefault(step, x.clone()) is not None and noisy(x, prompt, step)
    searcher.run(PROMPT)
    wanted = 4
    guided = Searcher(pipe, scorer, config(), Recorder(target=everything.seen[wanted]))
    guided.noisy_scores = lambda x, prompt, step: -(x - at_checkpoints[step][wanted]).flatten(1).norm(dim=1)
    result = guided.run(PROMPT)
    assert result.chosen == wanted and wanted in result.survivors and len(result.survivors) == 2
    torch.testing.assert_close(result.latents, everything.seen[wanted], rtol=1e-4, atol=1e-4)  # batches of 2, not 6: float order


def test_pruned_candidates_stop_costing_transformer_calls(toy):
    pipe, scorer = toy
    searcher = Searcher(pipe, scorer, config(n=8, keep=2, steps=12))
    passed = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: passed.append(kwargs["hidden_states"].shape[0] // 2),
                                                      with_kwargs=True)  # guided: each pass holds the conditional and the unconditional half
    try:
        result = searcher.run(PROMPT)
    finally:
        hook.remove()
    first, second = sorted(searcher.checkpoints)
    survivors = SearchConfig(n=8, keep=2, at=[0.6, 0.3]).survivors()
    expected = first * 8 + (second - first) * survivors[0] + (12 - second) * survivors[1]
    assert survivors == [4, 2] and sum(passed) == result.transformer_calls == expected < 8 * 12
    assert result.checkpoint_scores == 8 + 4 and len(result.pruned) == 6
    assert {c for c, _, _ in result.pruned} | set(result.survivors) == set(range(8))


def test_seeded_runs_repeat_and_keep_n_is_best_of_n(toy):
    pipe, scorer = toy
    first, again = (Searcher(pipe, scorer, config()).run(PROMPT) for _ in range(2))
    torch.testing.assert_close(first.latents, again.latents, rtol=0, atol=0)
    assert first.scores == again.scores and first.chosen == again.chosen
    no_pruning = Searcher(pipe, scorer, config(keep=6)).run(PROMPT)
    best_of_n = Searcher(pipe, scorer, config(strategy="best_of_n", keep=6)).run(PROMPT)
    torch.testing.assert_close(no_pruning.latents, best_of_n.latents, rtol=0, atol=0)
    assert no_pruning.chosen == best_of_n.chosen and no_pruning.scores["final"] == best_of_n.scores["final"]
    assert best_of_n.transformer_calls == 6 * 8 and best_of_n.checkpoint_scores == 0
    other_seed = Searcher(pipe, scorer, config()).run(PROMPT, seed=4)
    assert not torch.equal(other_seed.latents, first.latents)


def test_beam_refills_the_slots_with_diverging_copies(toy):
    pipe, scorer = toy
    result = Searcher(pipe, scorer, config(strategy="beam", n=6, keep=2)).run(PROMPT)
    final = result.scores["final"]
    assert len(final["candidates"]) == 6 and len(set(final["candidates"])) <= 2  # the lineages of the last two survivors
    assert len({round(s, 6) for s in final["scores"]}) == 6 and result.transformer_calls == 6 * 8  # the copies diverged


class TestBadInput:
    @pytest.mark.parametrize("overrides,message", [
        ({"keep": 7}, "need 1 <= keep <= n"),
        ({"at": [0.3, 0.6]}, "must decrease strictly and lie in \\(0, 1\\)"),
        ({"at": [1.2, 0.3]}, "must decrease strictly and lie in \\(0, 1\\)"),
        ({"at": []}, "needs checkpoint sigmas"),
        ({"strategy": "greedy"}, "unknown strategy 'greedy'"),
    ])
    def test_settings(self, toy, overrides, message):
        with pytest.raises(ValueError, match=message):
            Searcher(*toy, config(**overrides))

    def test_a_reward_whose_lora_sits_in_the_generator(self, toy):
        pipe = load_pipeline(SHIPPED_GENERATOR)
        with pytest.raises(ValueError, match="the pipeline's transformer carries LoRA layers"):
            Searcher(pipe, Scorer.from_pretrained(SHIPPED_REWARD, pipe), config())

    def test_a_reward_of_another_backbone(self, toy, tmp_path):
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from dina_lrm.testing.tiny_flux import build_tiny_flux_pipeline

        from dina_lrm import DiNaConfig, DiNaLRM

        flux = build_tiny_flux_pipeline()
        model = DiNaLRM(DiNaConfig.from_dict({"model": {"backbone_model_id": "black-forest-labs/FLUX.1-dev", "num_transformer_layers": 2,
                                                         "visual_head_idx": [2], "text_head_idx": [2], "reward_head": {"num_attn_heads": 2}}}),
                        flux.transformer)
        with pytest.raises(ValueError, match="the reward is built on the flux backbone but the pipeline is sd3"):
            Searcher(toy[0], Scorer.from_model(model, flux), config())


def test_the_sample_command_writes_images_scores_and_a_contact_sheet(tmp_path, capsys):
    import json

    from PIL import Image

    from dina_lrm.cli import main

    (tmp_path / "prompts.txt").write_text("two red circles\na blue square\n")
    args = ["sample", "--toy", "--prompts", str(tmp_path / "prompts.txt"), "--n", "4", "--keep", "1", "--at", "0.6,0.3", "--steps", "6",
            "--guidance-scale", "4", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    record = json.loads((tmp_path / "out" / "search.json").read_text())
    assert [p["prompt"] for p in record["prompts"]] == ["two red circles", "a blue square"]
    first = record["prompts"][0]
    assert len(first["scores"]) == 3 and len(first["pruned"]) == 3 and len(first["survivors"]) == 1 and first["chosen"] in first["survivors"]
    assert Image.open(tmp_path / "out" / first["image"]).size == (64, 64)
    assert Image.open(tmp_path / "out" / "contact_sheet.png").height > 2 * 128
    capsys.readouterr()
    assert main([*args[:-2], "--n", "5", "--out", str(tmp_path / "out")]) == 2  # other settings: the earlier run is kept
    assert "--overwrite" in capsys.readouterr().err and len(json.loads((tmp_path / "out" / "search.json").read_text())["prompts"]) == 2
    assert main(["sample", "--toy", "--out", str(tmp_path / "other")]) == 2
    assert "give --prompt TEXT or --prompts FILE" in capsys.readouterr().err
