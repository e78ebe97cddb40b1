"""The reward call of an RL trainer, end to end: ours against the naive path, in one run.

Each call scores P prompts x G samples (G = 8, Flow-GRPO's group size): new prompts every call, one
of them repeated from the call before (a prompt seen again in a later epoch). Inputs are the
sampler's clean latents, or its decoded images.

* ours: ``Scorer.score`` - each distinct prompt encoded once per call and kept in the prompt cache
  across calls, the images VAE-encoded as one batch, one backbone pass for the whole call;
* naive (in our own terms): every prompt encoded for every sample, no cache, each image VAE-encoded
  alone, one backbone pass per noise level.

Scores of both are checked equal (the noise is seeded per sample). Shapes:

* ``mid``: the mid-size SD3-shaped reward (``midsize.py``) with SD3 text encoders (two CLIPs and a
  T5) whose cost per prompt is ``--text-cost`` times one sample's reward cost at one level; the
  default 0.97 is SD3.5-M's ratio at 512x512 (CLIP-L + CLIP-G + T5-XXL at 128 tokens: 1.30 TFLOPs
  per prompt; the 12-layer reward: 1.34 TFLOPs per image; 0.19 at 1024x1024);
* ``toy``: the shipped toy generator with a reward of the demo's shape and the toy's own encoders.

    python bench/reward_call.py [--shape mid] [--inputs latents,images] [--prompts 2] [--calls 4] [--levels 0.4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from midsize import LATENT_SHAPE, build_model, sd3_prompt_encoder, text_flops

from dina_lrm import DiNaConfig, DiNaLRM, Scorer
from dina_lrm.data.images import vae_decode, vae_encode
from dina_lrm.eval.cost import scoring_flops
from dina_lrm.rewards import Setting
from dina_lrm.noise import SigmaTable, add_noise

GROUP = 8
TOY_GENERATOR = Path(__file__).resolve().parents[1] / "src" / "dina_lrm" / "toyworld" / "pretrained"
WORDS = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "small", "big", "left", "right", "two", "three"]


def prompt_stream(calls: int, per_call: int, seed: int = 0) -> list[list[str]]:
    """Each call's distinct prompts: new ones, and the first repeated from the call before."""
    generator = torch.Generator().manual_seed(seed)

    def new() -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=generator).tolist())

    stream, previous = [], None
    for _ in range(calls):
        prompts = [new() for _ in range(per_call)]
        if previous is not None:
            prompts[0] = previous[-1]
        stream.append(prompts)
        previous = prompts
    return stream


def mid_scorer(text_cost: float) -> tuple[Scorer, dict]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dina_lrm.testing.tiny_sd3 import small_vae

    model = build_model().eval()
    reward_flops = scoring_flops(model, LATENT_SHAPE, 109, Setting((0.4,), 1))
    one_layer, two_layers = text_flops(sd3_prompt_encoder(1)), text_flops(sd3_prompt_encoder(2))
    per_layer, clips = two_layers - one_layer, 2 * one_layer - two_layers
    layers = max(1, round((text_cost * reward_flops - clips) / per_layer))
    encoder = sd3_prompt_encoder(layers)
    vae = small_vae((32, 64, 64, 64), LATENT_SHAPE[0], 8 * LATENT_SHAPE[1], norm_num_groups=8, shift_factor=0.0609,
                    scaling_factor=1.5305).eval()
    scorer = Scorer(model, encoder, SigmaTable.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)), vae=vae)
    return scorer, {"latent_shape": LATENT_SHAPE, "t5_layers": layers, "text_gflops_per_prompt": text_flops(encoder) / 1e9,
                    "reward_gflops_per_item_level": reward_flops / 1e9}


def toy_scorer() -> tuple[Scorer, dict]:
    from dina_lrm.pipelines import load_pipeline
    from dina_lrm_toyworld.demo import DEMO_MODEL
    from dina_lrm_toyworld.generator import T5_TOKENS

    pipe = load_pipeline(TOY_GENERATOR)
    model = DiNaLRM(DiNaConfig.from_dict({"model": DEMO_MODEL, "data": {"train": {"max_sequence_length": T5_TOKENS}}}), pipe.transformer)
    scorer = Scorer.from_model(model, pipe)
    shape = (model.base_backbone.latent_channels, 16, 16)
    return scorer, {"latent_shape": shape, "text_gflops_per_prompt": text_flops(scorer.prompt_encoder) / 1e9,
                    "reward_gflops_per_item_level": scoring_flops(model, shape, scorer.prompt_encoder(["a"])[0].shape[1],
                                                                  Setting((0.4,), 1)) / 1e9}


def naive_call(scorer: Scorer, prompts: list[str], items: torch.Tensor, kind: str, levels: list[float], seeds: list[int]) -> torch.Tensor:
    model = scorer.model
    states, pooled = scorer.prompt_encoder.encode(prompts)  # every prompt, for every sample; no cache
    latents = torch.cat([vae_encode(scorer.vae, image[None]) for image in items]) if kind == "images" else items
    sigmas, timesteps = scorer.sigma_table.snap(torch.tensor(levels))
    noise = torch.stack([torch.randn((1, len(levels), *latents.shape[1:]), generator=torch.Generator().manual_seed(s))[0]
                         for s in seeds], dim=1)
    per_level = []
    for k in range(len(levels)):
        out = model.features(add_noise(latents, sigmas[k], noise[k]), states, pooled, timesteps[k].expand(len(latents)))
        per_level.append((out.visual, out.text, out.temb))
    return model.reward_head.forward_ensemble(per_level, out.text_mask)[:, 0]


def our_call(scorer: Scorer, prompts: list[str], items: torch.Tensor, kind: str, levels: list[float], seeds: list[int]) -> torch.Tensor:
    return scorer.score(prompts, **{kind: items}, noise_levels=levels, seeds=seeds).raw


def workload(scorer: Scorer, stream: list[list[str]], kind: str, shape: tuple[int, ...]) -> list[tuple[list[str], torch.Tensor]]:
    """Each call's (prompts, samples): G latents of ``shape`` per prompt, decoded to images for ``kind="images"``."""
    generator = torch.Generator().manual_seed(1)
    calls = []
    for prompts in stream:
        latents = torch.randn(len(prompts) * GROUP, *shape, generator=generator)
        with torch.no_grad():
            items = vae_decode(scorer.vae, latents) if kind == "images" else latents
        calls.append(([p for p in prompts for _ in range(GROUP)], items))
    return calls


def run(path, scorer: Scorer, calls, kind: str, levels: list[float]) -> tuple[float, list[torch.Tensor]]:
    scores, seconds = [], 0.0
    with torch.no_grad():
        for number, (prompts, items) in enumerate(calls):
            seeds = [1000 * number + i for i in range(len(prompts))]
            start = time.perf_counter()
            scores.append(path(scorer, prompts, items, kind, levels, seeds))
            seconds += time.perf_counter() - start
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["mid", "toy"], default="mid")
    parser.add_argument("--inputs", default="latents,images", help="comma-separated: latents, images")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts per call (x 8 samples each)")
    parser.add_argument("--calls", type=int, default=4, help="timed calls (one untimed warm-up call first)")
    parser.add_argument("--levels", default="0.4", help="comma-separated noise levels (several: the ensemble)")
    parser.add_argument("--text-cost", type=float, default=0.97, help="mid: text encoding per prompt / reward per sample and level")
    args = parser.parse_args()
    levels = [float(u) for u in args.levels.split(",")]
    scorer, facts = mid_scorer(args.text_cost) if args.shape == "mid" else toy_scorer()
    print(f"shape {args.shape}: {facts}; {args.prompts} prompts x {GROUP} samples per call, {args.calls} timed calls, "
          f"levels {levels}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| inputs | ours (items/s) | naive (items/s) | speed-up | max score difference |")
    print("|---|---|---|---|---|")
    for kind in args.inputs.split(","):
        stream = prompt_stream(args.calls + 1, args.prompts)
        calls = workload(scorer, stream, kind, facts["latent_shape"])
        scorer.prompt_encoder._cache.clear()
        run(our_call, scorer, calls[:1], kind, levels)  # warm-up; the cache now holds the first call's prompts
        run(naive_call, scorer, calls[:1], kind, levels)
        ours_s, ours = run(our_call, scorer, calls[1:], kind, levels)
        naive_s, naive = run(naive_call, scorer, calls[1:], kind, levels)
        items = sum(len(p) for p, _ in calls[1:])
        gap = max((a - b).abs().max().item() for a, b in zip(ours, naive))
        print(f"| {kind} | {items / ours_s:.2f} | {items / naive_s:.2f} | {naive_s / ours_s:.2f}x | {gap:.1e} |", flush=True)


if __name__ == "__main__":
    main()
