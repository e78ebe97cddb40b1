"""The toy world's commands, registered with ``dina-lrm`` through the ``dina_lrm.commands`` entry point:
``dina-lrm demo`` and ``dina-lrm toyworld pretrain | bias | align | ablations | benchmark``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dina_lrm.config import DTYPE_NAMES


def shipped_models() -> dict:
    """The shipped toy reward model and generator, for ``dina-lrm score --toy`` and ``sample --toy``."""
    from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD
    from dina_lrm_toyworld.generator import T5_TOKENS

    return {"reward": str(SHIPPED_REWARD), "model": str(SHIPPED_GENERATOR), "max_sequence_length": T5_TOKENS}


def run_toy_benchmark(args) -> int:
    from dina_lrm_toyworld.benchmark import write_toy_benchmark

    path = write_toy_benchmark(args.out, prompts=args.prompts, images_per_prompt=args.images_per_prompt, seed=args.seed)
    print(f"Wrote {path} (HPDv2 layout). Evaluate with: dina-lrm eval --format hpdv2 --input {path} --reward REWARD --model GENERATOR")
    return 0


def run_toy_align(args) -> int:
    from dina_lrm.config import apply_overrides, from_dict
    from dina_lrm_toyworld.alignment import ToyAlignmentConfig, run_alignment_experiment

    raw = apply_overrides({k: getattr(args, k) for k in ("base", "seeds", "runs") if getattr(args, k)}, args.set)
    run_alignment_experiment(args.out, from_dict(ToyAlignmentConfig, raw), overwrite=args.overwrite)
    print((Path(args.out) / "alignment.md").read_text())
    return 0


def run_toy_bias(args) -> int:
    from dina_lrm.config import apply_overrides
    from dina_lrm_toyworld.alignment import biased_base_recipe
    from dina_lrm_toyworld.pretrain import pretrain

    pretrain(Path(args.out), biased_base_recipe(**apply_overrides({}, args.set)))
    print(f"Wrote the biased toy generator to {args.out}")
    return 0


def run_toy_ablations(args) -> int:
    from dina_lrm.config import apply_overrides, from_dict
    from dina_lrm_toyworld.ablations import AblationConfig, run_ablations

    raw = apply_overrides({k: getattr(args, k) for k in ("seeds", "rows", "steps") if getattr(args, k)}, args.set)
    run_ablations(args.out, from_dict(AblationConfig, raw), generator_dir=args.generator, overwrite=args.overwrite)
    print((Path(args.out) / "ablations.md").read_text())
    return 0


def run_demo(args) -> int:
    from dina_lrm_toyworld.demo import DemoConfig
    from dina_lrm_toyworld.demo import run_demo as demo
    from dina_lrm_toyworld.preferences import PreferenceDataConfig

    data = {k: getattr(args, k) for k in ("train_prompts", "test_prompts", "flip_rate") if getattr(args, k) is not None}
    demo_options = {"steps": args.steps} if args.steps is not None else {}
    config = DemoConfig(data=PreferenceDataConfig(seed=args.seed, **data), seed=args.seed, **demo_options)
    demo(Path(args.out), config, generator_dir=args.generator, from_scratch=args.from_scratch, overwrite=args.overwrite)
    return 0


def run_pretrain(args) -> int:
    from dina_lrm_toyworld.pretrain import PretrainConfig, pretrain

    overrides = {k: getattr(args, k) for k in ("vae_steps", "generator_steps", "dataset_size", "vae_from", "generator_from", "save_dtype") if getattr(args, k) is not None}
    pretrain(Path(args.out), PretrainConfig(seed=args.seed, **overrides))
    print(f"Wrote the toy generator to {args.out} (load it with dina_lrm.pipelines.load_pipeline)")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the toy world end to end: data, DiNa-LRM vs. baselines, report")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--steps", type=int, help="training steps per DiNa-LRM variant; the pixel reward gets the same FLOPs "
                      "(default: DemoConfig's)")
    demo.add_argument("--generator", help="toy generator directory (default: the shipped one)")
    demo.add_argument("--from-scratch", action="store_true", help="pretrain the toy generator first (~65 min on 2 cores)")
    demo.add_argument("--train-prompts", type=int, help="(default: PreferenceDataConfig's)")
    demo.add_argument("--test-prompts", type=int, help="(default: PreferenceDataConfig's)")
    demo.add_argument("--flip-rate", type=float, help="share of training labels the noisy rater flips (default 0.2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace a demo with other settings in --out")
    demo.set_defaults(func=run_demo)

    toyworld = commands.add_parser("toyworld", help="the toy world's generator").add_subparsers(dest="action", required=True)
    pretrain = toyworld.add_parser("pretrain", help="train the toy VAE, text encoders and generator from scratch")
    pretrain.add_argument("--out", required=True)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--vae-steps", type=int, help="VAE training steps (default: PretrainConfig's)")
    pretrain.add_argument("--generator-steps", type=int, help="generator training steps (default: PretrainConfig's)")
    pretrain.add_argument("--dataset-size", type=int, help="renders the generator trains on (default: PretrainConfig's)")
    pretrain.add_argument("--vae-from", help="reuse the VAE of this toy pipeline directory instead of training one")
    pretrain.add_argument("--generator-from", help="continue training this toy pipeline directory's generator (its VAE is kept)")
    pretrain.add_argument("--save-dtype", choices=DTYPE_NAMES, help="precision of the saved weights (default float32)")
    pretrain.set_defaults(func=run_pretrain)
    toy_align = toyworld.add_parser("align", help="the alignment experiment: DiffusionNFT with the judge, DiNa-LRM and the pixel "
                                    "reward, ReFL with DiNa-LRM, on the biased toy generator after its gate, several seeds "
                                    "(see docs/alignment.md)")
    toy_align.add_argument("--out", default="demo_out/alignment")
    toy_align.add_argument("--base", help="biased (default), early, or a toy pipeline directory")
    toy_align.add_argument("--seeds", type=int, nargs="+", help="(default: 0 1 2)")
    toy_align.add_argument("--runs", nargs="+", metavar="RUN", help="a subset of the runs, by name (default: all but 'GRPO + judge')")
    toy_align.add_argument("--overwrite", action="store_true", help="replace an earlier experiment in --out")
    toy_align.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a ToyAlignmentConfig key, e.g. settings.nft.max_steps=20")
    toy_align.set_defaults(func=run_toy_align)
    bias = toyworld.add_parser("bias", help="the biased base: continue the shipped generator on renders that draw half of the "
                               "object groups in a confusion colour (the recipe of the shipped pretrained_biased)")
    bias.add_argument("--out", required=True)
    bias.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a PretrainConfig key, e.g. generator_steps=200")
    bias.set_defaults(func=run_toy_bias)
    ablations = toyworld.add_parser("ablations", help="the paper's reward-model table in the toy world: every ablation row, "
                                    "several seeds, intervals (see docs/toyworld.md)")
    ablations.add_argument("--out", default="demo_out/ablations")
    ablations.add_argument("--seeds", type=int, nargs="+", help="(default: 0 1 2)")
    ablations.add_argument("--rows", nargs="+", metavar="ROW", help="a subset of the rows, by name (default: all)")
    ablations.add_argument("--steps", type=int, help="training steps per row (default: AblationConfig's)")
    ablations.add_argument("--generator", help="toy generator directory (default: the shipped one)")
    ablations.add_argument("--overwrite", action="store_true", help="replace earlier ablations in --out")
    ablations.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override an AblationConfig key, e.g. data.train_prompts=600")
    ablations.set_defaults(func=run_toy_ablations)
    benchmark = toyworld.add_parser("benchmark", help="write a judge-ranked toy benchmark (HPDv2 layout) for `dina-lrm eval`")
    benchmark.add_argument("--out", required=True)
    benchmark.add_argument("--prompts", type=int, default=40)
    benchmark.add_argument("--images-per-prompt", type=int, default=4)
    benchmark.add_argument("--seed", type=int, default=0)
    benchmark.set_defaults(func=run_toy_benchmark)
