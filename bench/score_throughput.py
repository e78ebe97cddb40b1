"""K=3 noise-level ensemble scoring: our one batched backbone pass vs. the per-level loop.

The mid-size model of ``midsize.py`` (SD3-shaped unless ``--backbone`` picks FLUX, Z-Image or
Qwen-Image at the same sizes) on the CPU. Each mode runs in its own process so its peak resident
memory can be read; scores of both are checked equal.

    python bench/score_throughput.py [--backbone sd3] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
from midsize import BACKBONES, LATENT_SHAPE, build_model, text_inputs

LEVELS = [0.2, 0.5, 0.8]


def looped(model, latents, states, pooled, timesteps):
    """The naive way: one backbone pass per noise level, then the head's ensemble."""
    levels = []
    for k in range(latents.shape[0]):
        out = model.features(latents[k], states, pooled, timesteps[k])
        levels.append((out.visual, out.text, out.temb))
    return model.reward_head.forward_ensemble(levels, out.text_mask)


def run_mode(mode: str, backbone: str, batch: int, repeats: int, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    model = build_model(backbone=backbone).eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(LEVELS), batch, *LATENT_SHAPE, generator=generator)
    states, pooled = text_inputs(batch, generator, backbone)
    timesteps = torch.tensor(LEVELS) * 1000
    score = model.forward_ensemble if mode == "batched" else lambda *a: looped(model, *a)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        scores = score(latents, states, pooled, timesteps)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            score(latents, states, pooled, timesteps)
        seconds = (time.perf_counter() - start) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"mode": mode, "latents_per_s": batch / seconds, "s_per_batch": seconds,
               "peak_extra_mib": (peak - baseline) / 1024, "scores": scores[:, 0].tolist()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=BACKBONES, default="sd3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for mode in ("batched", "loop"):
        queue = context.Queue()
        process = context.Process(target=run_mode, args=(mode, args.backbone, args.batch, args.repeats, queue))
        process.start()
        process.join()
        if queue.empty():
            raise SystemExit(f"the {mode} run failed (exit code {process.exitcode}); its traceback is above")
        results[mode] = queue.get()
    batched, loop = results["batched"], results["loop"]
    gap = max(abs(a - b) for a, b in zip(batched["scores"], loop["scores"]))
    print(f"{args.backbone}: K={len(LEVELS)} ensemble, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':24}{'batched (ours)':>16}{'per-level loop':>16}")
    print(f"{'latents/s':24}{batched['latents_per_s']:16.2f}{loop['latents_per_s']:16.2f}")
    print(f"{'seconds per batch':24}{batched['s_per_batch']:16.3f}{loop['s_per_batch']:16.3f}")
    print(f"{'peak extra memory (MiB)':24}{batched['peak_extra_mib']:16.0f}{loop['peak_extra_mib']:16.0f}")
    print(f"speed-up {loop['s_per_batch'] / batched['s_per_batch']:.2f}x; max score difference {gap:.2e}")
    print(json.dumps({k: {m: v for m, v in r.items() if m != "scores"} for k, r in results.items()}))


if __name__ == "__main__":
    main()
