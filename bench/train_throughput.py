"""Training-step throughput and memory: LoRA vs. frozen backbone vs. full fine-tuning.

One optimizer step = shared noise for a batch of pairs, one backbone pass over chosen and rejected
together, the Thurstone loss, backward, grad clipping and AdamW; the same step the trainer runs.
The mid-size SD3-shaped model of ``midsize.py`` on the CPU; each mode runs in its own process so
its peak resident memory can be read.

    python bench/train_throughput.py [--batch 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
from midsize import LATENT_SHAPE, build_model, text_inputs

MODES = {
    "lora": {"use_lora": True},
    "frozen": {"use_lora": False, "freeze_backbone": True},
    "full": {"use_lora": False, "freeze_backbone": False},
}


def run_mode(mode: str, batch: int, steps: int, checkpointing: bool, queue) -> None:
    from dina_lrm.noise import NoiseSampler, SigmaTable
    from dina_lrm.train.step import PreferenceBatch, preference_step

    model = build_model(**MODES[mode]).train()
    model.enable_gradient_checkpointing(checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    states, pooled = text_inputs(batch, generator)
    pairs = PreferenceBatch(torch.randn(batch, *LATENT_SHAPE, generator=generator),
                            torch.randn(batch, *LATENT_SHAPE, generator=generator), states, pooled)
    sigma_table, sampler = SigmaTable.from_shift(3.0), NoiseSampler()

    def step():
        out = preference_step(model, pairs, sigma_table, sampler, generator=generator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up; also allocates the optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"pairs_per_s": batch / seconds, "s_per_step": seconds, "peak_extra_mib": (peak - baseline) / 1024,
               "trainable_m": sum(p.numel() for p in trainable) / 1e6})


def measure(mode: str, batch: int, steps: int, checkpointing: bool = False) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_mode, args=(mode, batch, steps, checkpointing, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    args = parser.parse_args()
    results = {mode: measure(mode, args.batch, args.steps) for mode in MODES}
    results["full + grad ckpt"] = measure("full", args.batch, args.steps, checkpointing=True)
    print(f"training step, {args.batch} pairs, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':26}" + "".join(f"{name:>18}" for name in results))
    rows = [("pairs/s", "pairs_per_s", ".2f"), ("seconds per step", "s_per_step", ".3f"),
            ("peak extra memory (MiB)", "peak_extra_mib", ".0f"), ("trainable params (M)", "trainable_m", ".2f")]
    for label, key, fmt in rows:
        print(f"{label:26}" + "".join(f"{r[key]:>18{fmt}}" for r in results.values()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
