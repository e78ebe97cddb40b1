"""The toy-world alignment experiment: ReFL and GRPO with DiNa-LRM (latents), with the pixel reward
(decodes) and GRPO with the judge itself, on the early toy generator, each for a fixed number of
steps and 3 seeds; judged on test prompts at the checkpoint the validation judge keeps.

The same as ``make demo-align`` / ``dina-lrm toyworld align``; arguments pass through:

    python bench/align_toyworld.py [--out demo_out/alignment] [--seeds 0 1 2] [--runs "ReFL + DiNa-LRM" ...] [--set refl.max_steps=20]
"""

from __future__ import annotations

import sys

from dina_lrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["toyworld", "align", *sys.argv[1:]]))
