"""Toy-world alignment for the same training-time budget: GRPO with DiNa-LRM on latents, with the pixel
reward (decode, then score) and with the judge itself (upper bound), plus DRaFT-1 with the two
differentiable rewards. Judged on held-out prompts by the toy world's judge.

Needs the reward models of ``make demo`` (DEMO_OUT/reward_model, DEMO_OUT/pixel_reward.safetensors).
Without the pixel reward file, one is trained first from DEMO_OUT/shards with the demo's recipe.

    python bench/align_toyworld.py [--demo-out demo_out] [--out demo_out/alignment] [--budget-seconds 90]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dina_lrm.toyworld.alignment import RUNS, ToyAlignmentConfig, run_alignment_experiment, save_pixel_reward
from dina_lrm.toyworld.demo import SHIPPED_GENERATOR, DemoConfig, train_pixel_from_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", default="demo_out")
    parser.add_argument("--out", help="default DEMO_OUT/alignment")
    parser.add_argument("--budget-seconds", type=float, default=ToyAlignmentConfig.budget_s, help="training seconds per run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), help="default: all")
    args = parser.parse_args()
    demo_out = Path(args.demo_out)
    reward_dir, pixel_path = demo_out / "reward_model", demo_out / "pixel_reward.safetensors"
    if not reward_dir.is_dir():
        raise SystemExit(f"{reward_dir} not found: run `make demo` first")
    if not pixel_path.is_file():
        print(f"{pixel_path} not found: training the pixel reward from {demo_out / 'shards'} first")
        save_pixel_reward(train_pixel_from_shards(demo_out / "shards", DemoConfig()), pixel_path)
    config = ToyAlignmentConfig(budget_s=args.budget_seconds, **({"runs": args.runs} if args.runs else {}))
    out = Path(args.out or demo_out / "alignment")
    run_alignment_experiment(out, reward_dir, pixel_path, SHIPPED_GENERATOR, config)
    print((out / "alignment.md").read_text())


if __name__ == "__main__":
    main()
