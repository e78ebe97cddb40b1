"""ReFL against reward hacking, in the toy world: the paper's own means and the published recipes'
side by side on "ReFL + DiNa-LRM", each for 3 seeds, reusing the rewards of a finished
``make demo-align`` (the same base, rewards, prompts and budget):

* the recipe (u = 0.4, one noise draw), the 3-level noise ensemble {0.2, 0.5, 0.7} as the reward,
  scoring at a higher u (0.7);
* the authors' remedy, the flow-matching "pretrain" loss (lambda 1) on the reward's training latents
  (the chosen side of its preference pairs), and a KL (L2 of the velocity) to the frozen generator;
* the authors' EMA of the LoRA (0.9) and, for contrast, the run without the guard's early stop.

    python bench/refl_hacking.py --rewards-from demo_out/alignment [--out bench_out/refl_hacking] [--seeds 0 1 2]

Prints the test judge gain at the kept checkpoint (bootstrap interval over prompts), the final
weights' gain, where the guard kept and where reward and judge parted, and writes ``refl_hacking.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dina_lrm_toyworld.alignment import run_alignment_experiment
from dina_lrm_toyworld.config import ToyAlignmentConfig

RUN = "ReFL + DiNa-LRM"


def variants(rewards_from: Path) -> dict[str, dict]:
    pretrain = str(rewards_from / "shards" / "train")
    return {
        "recipe (u 0.4)": {},
        "ensemble {0.2, 0.5, 0.7}": {"reward": {"noise_levels": [0.2, 0.5, 0.7]}},
        "u 0.7": {"reward": {"u": 0.7}},
        "pretrain loss (lambda 1)": {"refl": {"pretrain_data": pretrain, "pretrain_weight": 1.0}},
        "KL 1.0": {"refl": {"kl_coef": 1.0}},
        "EMA 0.9": {"ema_decay": 0.9},
        "ensemble + pretrain loss": {"reward": {"noise_levels": [0.2, 0.5, 0.7]}, "refl": {"pretrain_data": pretrain, "pretrain_weight": 1.0}},
        "no early stop": {"early_stop_patience": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards-from", required=True, help="a finished `dina-lrm toyworld align` folder")
    parser.add_argument("--out", default="bench_out/refl_hacking")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="a subset of the variants, by name")
    args = parser.parse_args()
    rewards_from, out = Path(args.rewards_from), Path(args.out)
    base = json.loads((rewards_from / "alignment.json").read_text())["config"]["base"]
    rows = {}
    for name, settings in variants(rewards_from).items():
        if args.only and name not in args.only:
            continue
        config = ToyAlignmentConfig(base=base, seeds=args.seeds, runs=[RUN], rewards_from=str(rewards_from), settings={"refl": settings})
        folder = out / name.replace(" ", "_").replace("{", "").replace("}", "").replace(",", "").replace("(", "").replace(")", "")
        run = run_alignment_experiment(folder, config, overwrite=True)["runs"][RUN]
        rows[name] = run
        low, high = run["test_gain_ci"]
        print(f"| {name} | {run['test_gain']:+.3f} [{low:+.3f}, {high:+.3f}] | {', '.join(f'{g:+.3f}' for g in run['test_gain_per_seed'])} | "
              f"{run['test_final_gain']:+.3f} | {run['best_steps']} | {run['divergence_steps']} | {run['cpu_s_per_step']:.2f} |", flush=True)
    (out / "refl_hacking.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
