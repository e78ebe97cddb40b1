import torch

from dina_lrm.models.sd3_text import SD3PromptEncoder


def test_prompt_embeddings_match_diffusers_sd3_pipeline(pipe):
    prompts = ["a red circle", "two blue squares to the left of a yellow triangle"]
    encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=16)
    states, pooled = encoder(prompts)
    ref_states, _, ref_pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert states.shape == (2, 77 + 16, 32) and pooled.shape == (2, 64)
    torch.testing.assert_close(states, ref_states)
    torch.testing.assert_close(pooled, ref_pooled)


def test_each_distinct_prompt_is_encoded_once(pipe):
    encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=16)
    seen = []
    pipe.text_encoder_3.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    states, _ = encoder(["a", "b", "a", "a", "b"])
    assert seen == [2]
    torch.testing.assert_close(states[0], states[2])
    encoder(["b", "c"])
    assert seen == [2, 1]  # "b" came from the cache


def test_cache_evicts_least_recently_used(pipe):
    encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=16, cache_size=2)
    encoder(["a"]), encoder(["b"]), encoder(["a"]), encoder(["c"])
    assert list(encoder._cache) == ["a", "c"]


def test_without_t5_the_t5_part_is_zeros(pipe):
    encoder = SD3PromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2, None], [pipe.text_encoder, pipe.text_encoder_2, None],
        max_sequence_length=8, joint_attention_dim=32,
    )
    states, _ = encoder("a red circle")
    assert states.shape == (1, 77 + 8, 32) and torch.count_nonzero(states[:, 77:]) == 0


def test_eight_threads_with_more_prompts_than_the_cache_holds_get_their_own_embeddings(pipe):
    """flow_grpo calls the reward from a pool of 8 threads; every call must get its prompts' embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=8, cache_size=4)
    prompts = [f"prompt number {i}" for i in range(24)]
    reference = {p: SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=8).encode([p])[0][0] for p in prompts}

    def call(n):
        batch = [prompts[(n * 5 + k) % len(prompts)] for k in range(6)]
        states, _ = encoder(batch)
        return batch, states

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(200)))
    for batch, states in results:
        for prompt, state in zip(batch, states):
            torch.testing.assert_close(state, reference[prompt])
    assert len(encoder._cache) <= 4
