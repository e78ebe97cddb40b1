"""K=3 noise-level ensemble scoring, every way we offer against the naive per-level loop, in one run.

The mid-size model of ``midsize.py`` (SD3-shaped unless ``--backbone`` picks FLUX, Z-Image or
Qwen-Image at the same sizes) on the CPU. Each (mode, batch) is timed in its own process, and measured
for memory in another: there glibc hands every allocation above 16 KiB back to the system when it is
freed (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the live tensors, and the memory is
its peak during the calls (sampled every 5 ms) above its level before them - the activations one
call adds. Every mode's scores are compared with the loop's.

Modes: ``loop`` (naive: one backbone pass per level, then the head); ``one pass`` (all K levels as one
batch, ``max_batch_items=K*B``); ``ours`` (the default: one level's batch per pass, each level's
features turned into the head's small tokens at once); ``bf16`` (ours with the backbone under bf16
autocast, head in fp32); ``compile`` (ours with ``torch.compile``d blocks; compiling is not timed);
``grad`` / ``grad + checkpointing`` (forward and backward to the latents, as differentiable scoring
for ReFL / DRaFT runs it).

    python bench/score_throughput.py [--backbone sd3] [--batches 1,4] [--repeats 5] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import gc
import multiprocessing as mp
import os
import time

import torch
from midsize import BACKBONES, LATENT_SHAPE, build_model, text_inputs

from dina_lrm.memory import MemoryMeter, resident_bytes

LEVELS = [0.2, 0.5, 0.8]
MODES = ("loop", "one pass", "ours", "bf16", "compile", "grad", "grad + checkpointing")


def looped(model, latents, states, pooled, timesteps):
    """The naive way: one backbone pass per noise level, then the head's ensemble."""
    levels = []
    for k in range(latents.shape[0]):
        out = model.features(latents[k], states, pooled, timesteps[k])
        levels.append((out.visual, out.text, out.temb))
    return model.reward_head.forward_ensemble(levels, out.text_mask)


def scoring_function(mode: str, model, batch: int):
    if mode == "loop":
        return lambda *inputs: looped(model, *inputs)
    if mode == "one pass":
        return lambda *inputs: model.forward_ensemble(*inputs, max_batch_items=len(LEVELS) * batch)
    if mode == "bf16":
        model.enable_autocast(torch.bfloat16)
    if mode == "compile":
        model.compile_blocks(dynamic=False)
    if mode.startswith("grad"):
        model.enable_gradient_checkpointing(mode == "grad + checkpointing")

        def differentiable(latents, *rest):
            latents = latents.detach().requires_grad_(True)
            scores = model.forward_ensemble(latents, *rest)
            scores.sum().backward()
            return scores.detach()

        return differentiable
    return model.forward_ensemble


def run_mode(mode: str, backbone: str, batch: int, repeats: int, queue) -> None:
    model = build_model(backbone=backbone).eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(LEVELS), batch, *LATENT_SHAPE, generator=generator)
    states, pooled = text_inputs(batch, generator, backbone)
    timesteps = torch.tensor(LEVELS) * 1000
    score = scoring_function(mode, model, batch)
    with torch.no_grad() if not mode.startswith("grad") else torch.enable_grad():
        score(latents, states, pooled, timesteps)  # warm-up (and compilation)
        gc.collect()
        before = resident_bytes()
        with MemoryMeter(torch.device("cpu")) as meter:
            start = time.perf_counter()
            for _ in range(repeats):
                scores = score(latents, states, pooled, timesteps)
            seconds = (time.perf_counter() - start) / repeats
    queue.put({"latents_per_s": batch / seconds, "s_per_batch": seconds, "peak_extra_mib": (meter.peak_bytes - before) / 2**20,
               "scores": scores[:, 0].tolist()})


def in_process(mode: str, backbone: str, batch: int, repeats: int, malloc_mmap_threshold: str | None = None) -> dict:
    if malloc_mmap_threshold is None:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    else:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = malloc_mmap_threshold  # read by glibc when the spawned process starts
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_mode, args=(mode, backbone, batch, repeats, queue))
    process.start()
    process.join()
    if queue.empty():
        raise SystemExit(f"the {mode} run failed (exit code {process.exitcode}); its traceback is above")
    return queue.get()


def measure(mode: str, backbone: str, batch: int, repeats: int) -> dict:
    timed = in_process(mode, backbone, batch, repeats)
    timed["peak_extra_mib"] = in_process(mode, backbone, batch, 2, malloc_mmap_threshold="16384")["peak_extra_mib"]
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=BACKBONES, default="sd3")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    args = parser.parse_args()
    modes = ["loop"] + [m for m in args.modes.split(",") if m != "loop"]
    print(f"{args.backbone}: K={len(LEVELS)} ensemble, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.repeats} timed repeats; memory: the peak resident set during the timed calls above the one before them")
    print("| batch | mode | latents/s | vs loop | peak extra MiB | vs loop | max score difference to the loop |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for batch in map(int, args.batches.split(",")):
        loop = None
        for mode in modes:
            result = measure(mode, args.backbone, batch, args.repeats)
            loop = loop or result
            gap = max(abs(a - b) for a, b in zip(result["scores"], loop["scores"]))
            memory_ratio = result["peak_extra_mib"] / loop["peak_extra_mib"] if loop["peak_extra_mib"] > 0 else float("nan")
            print(f"| {batch} | {mode} | {result['latents_per_s']:.2f} | {result['latents_per_s'] / loop['latents_per_s']:.2f}x "
                  f"| {result['peak_extra_mib']:.0f} | {memory_ratio:.2f}x | {gap:.1e} |", flush=True)
            results[f"{batch}/{mode}"] = {k: v for k, v in result.items() if k != "scores"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
