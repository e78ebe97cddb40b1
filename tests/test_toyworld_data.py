import numpy as np
import pytest
import torch

from dina_lrm.models.sd3_text import SD3PromptEncoder
from dina_lrm.pipelines import load_pipeline
from dina_lrm_toyworld.config import ToyGeneratorConfig
from dina_lrm_toyworld.generator import T5_TOKENS, build_tokenizer, build_toy_pipeline
from dina_lrm_toyworld.preferences import Candidate, _normal_cdf, candidate_pairs, label_pairs, rater_noise

SMALL = ToyGeneratorConfig(vae_channels=(8, 8), num_layers=2, dual_attention_layers=(0,), attention_head_dim=8,
                           num_attention_heads=2, clip_width=16, clip_layers=1)


def candidate(prompt, score, source="generated"):
    return Candidate(prompt, torch.full((4, 2, 2), score), np.zeros((8, 8, 3), np.uint8), score, score, 1.0, source)


def test_word_level_tokenizer():
    tokenizer = build_tokenizer(max_length=16)
    ids = tokenizer(["two red circles"], padding="max_length", max_length=16).input_ids[0]
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words[:5] == ["<bos>", "two", "red", "circles", "<eos>"] and set(words[5:]) == {"<pad>"}
    assert tokenizer.convert_ids_to_tokens(tokenizer("a pink circle").input_ids)[2] == "<unk>"


def test_toy_pipeline_round_trip_and_prompt_encoding_match_diffusers(tmp_path):
    build_toy_pipeline(SMALL, seed=0).save_pretrained(str(tmp_path))
    pipe = load_pipeline(tmp_path)
    assert pipe.text_encoder_3 is None and pipe.tokenizer.model_max_length == 16 and pipe.vae_scale_factor == 2
    prompts = ["two red circles", "a small blue square above a cyan triangle"]
    ours, ours_pooled = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)(prompts)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                     max_sequence_length=T5_TOKENS)
    assert ours.shape == (2, 16 + T5_TOKENS, 2 * SMALL.clip_width)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_pooled, theirs_pooled)


def test_rater_noise_hits_the_flip_rate():
    gaps = np.random.default_rng(0).uniform(0.05, 1.0, size=400)
    noise = rater_noise(gaps, 0.2)
    assert np.mean([_normal_cdf(-g / noise) for g in gaps]) == pytest.approx(0.2, abs=1e-3)
    assert rater_noise(gaps, 0.0) == 0.0
    with pytest.raises(ValueError, match="flip_rate"):
        rater_noise(gaps, 0.6)


def test_label_pairs_flips_about_the_asked_share_and_keeps_the_rest():
    rng = np.random.default_rng(1)
    pairs = [(candidate(f"p{i}", 0.5 + g), candidate(f"p{i}", 0.5)) for i, g in enumerate(rng.uniform(0.05, 0.5, 3000))]
    records, flipped = label_pairs(pairs, 0.2, np.random.default_rng(2), "train")
    assert flipped == pytest.approx(0.2, abs=0.025)
    disagree = np.mean([r.chosen[0, 0, 0] < r.rejected[0, 0, 0] for r in records])
    assert disagree == pytest.approx(flipped)
    clean, none = label_pairs(pairs, 0.0, np.random.default_rng(2), "test")
    assert none == 0 and all(r.chosen[0, 0, 0] > r.rejected[0, 0, 0] for r in clean)
    with pytest.raises(ValueError, match="no candidate pairs"):
        label_pairs([], 0.2, rng, "x")


def test_candidate_pairs_respect_groups_gaps_and_corruption_pairing():
    group = [candidate("a", 0.9), candidate("a", 0.5), candidate("a", 0.52), candidate("b", 0.1),
             candidate("a", 1.0, "render"), candidate("a", 0.6, "colour")]
    pairs = candidate_pairs(group, min_gap=0.05)
    scores = sorted((round(a.score, 2), round(b.score, 2)) for a, b in pairs)
    # generated a-samples pair among themselves (0.5 vs 0.52 is a tie); the corruption pairs with its render only
    assert scores == [(0.9, 0.5), (0.9, 0.52), (1.0, 0.6)]
    assert all(a.score > b.score for a, b in pairs)
