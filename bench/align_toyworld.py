"""The toy-world alignment experiment on the biased toy base: its gate (fine-tuning on ground-truth
renders; DiffusionNFT with a constant reward), DiffusionNFT with the judge, DiNa-LRM (latents) and the
pixel reward (decodes), and ReFL with DiNa-LRM, each for a fixed number of steps and 3 seeds; judged
on test prompts at the checkpoint the validation judge keeps (``--base early``: the early generator).

The same as ``make demo-align`` / ``dina-lrm toyworld align``; arguments pass through:

    python bench/align_toyworld.py [--out demo_out/alignment] [--seeds 0 1 2] [--runs "NFT + judge" ...] [--base early] [--set nft.max_steps=20]
"""

from __future__ import annotations

import sys

from dina_lrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["toyworld", "align", *sys.argv[1:]]))
