"""Reward-guided sampling in the toy world (``dina_lrm_toyworld.search_experiment``): the judge score
of the returned image against its cost for plain sampling, best-of-N with the pixel reward, with
DiNa-LRM and with the judge, and prune-and-continue with DiNa-LRM; the rank correlation of the noisy
DiNa-LRM score with the final judge score at sigma 0.8 / 0.6 / 0.4 / 0.2. Writes ``OUT/results.json``.

    python bench/search_toyworld.py [--prompts 32] [--pixel-reward demo_out/pixel_reward.safetensors] [--out search_out]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dina_lrm.pipelines import load_pipeline
from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD
from dina_lrm_toyworld.rewards import load_pixel_reward
from dina_lrm_toyworld.search_experiment import run_search_experiment, search_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="held-out (test split) toy prompts")
    parser.add_argument("--pixel-reward", default="demo_out/pixel_reward.safetensors", help="the demo's pixel reward (make demo writes it)")
    parser.add_argument("--out", default="search_out")
    args = parser.parse_args()
    if not Path(args.pixel_reward).is_file():
        raise SystemExit(f"{args.pixel_reward} not found: run `make demo` first (it trains the pixel reward), or pass --pixel-reward")
    results = run_search_experiment(load_pipeline(SHIPPED_GENERATOR), SHIPPED_REWARD, load_pixel_reward(args.pixel_reward), args.prompts)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n".join(search_markdown(results)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
