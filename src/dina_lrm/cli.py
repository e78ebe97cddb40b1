"""Command line: ``dina-lrm score`` and ``dina-lrm demo``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, image path) rows from a CSV (header ``prompt,image``) or JSONL file; relative image
    paths are resolved against the file's folder."""
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not row.get("prompt") or not row.get("image"):
            raise ValueError(f"{path}, row {number}: needs non-empty 'prompt' and 'image' fields, got {row}")
        pairs.append((row["prompt"], str((path.parent / row["image"]).resolve())))
    if not pairs:
        raise ValueError(f"{path} holds no rows")
    return pairs


def run_score(args) -> int:
    from dina_lrm.scorer import Scorer

    if args.pairs:
        pairs = read_pairs(Path(args.pairs))
    elif args.prompt and args.images:
        pairs = [(args.prompt, image) for image in args.images]
    else:
        raise SystemExit("dina-lrm score: give --prompt and IMAGE paths, or --pairs FILE")
    scorer = Scorer.from_pretrained(args.reward, args.model, device=args.device, dtype=DTYPES[args.dtype])
    result = scorer.score(
        [p for p, _ in pairs],
        images=[i for _, i in pairs],
        u=args.u,
        noise_levels=args.noise_levels,
        n_draws=args.n_draws,
        seed=args.seed,
    )
    rows = [
        {"prompt": prompt, "image": image, **scores} for (prompt, image), scores in zip(pairs, result.rows())
    ]
    if args.json:
        print(json.dumps({"noise_levels": result.sigmas.tolist(), "n_draws": args.n_draws, "scores": rows}, indent=2))
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    lines = [f"{'raw':>9}  {'normalized':>10}  prompt | image"]
    for row in rows:
        lines.append(f"{row['raw']:9.4f}  {row['normalized']:10.4f}  {row['prompt']} | {row['image']}")
    return "\n".join(lines)


def run_demo(args) -> int:
    from dina_lrm.toyworld.demo import run_demo as demo

    demo(Path(args.out), steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dina-lrm", description="Diffusion-native latent reward models.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score prompt/image pairs with a trained reward model")
    score.add_argument("--reward", required=True, help="reward model directory (config.json + checkpoint/)")
    score.add_argument("--model", required=True, help="generator pipeline: local directory or hub id")
    score.add_argument("--prompt", help="one prompt for all IMAGE arguments")
    score.add_argument("images", nargs="*", metavar="IMAGE")
    score.add_argument("--pairs", help="CSV (prompt,image header) or JSONL file of pairs")
    score.add_argument("--u", type=float, default=0.1, help="noise level (0.1 suits images from files)")
    score.add_argument("--noise-levels", type=float, nargs="+", help="ensemble over these noise levels")
    score.add_argument("--n-draws", type=int, default=1, help="average this many noise draws")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--device", default="cpu")
    score.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    score.add_argument("--json", action="store_true", help="machine-readable output")
    score.set_defaults(func=run_score)

    demo = commands.add_parser("demo", help="train, save, reload and score a reward model on a tiny generator")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, TypeError) as err:
        print(f"dina-lrm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
