"""The toy world's commands, registered with ``dina-lrm`` through the ``dina_lrm.commands`` entry point:
``dina-lrm demo`` and ``dina-lrm toyworld pretrain | bias | align | ablations | benchmark``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dina_lrm import add_config_arguments, load_settings
from dina_lrm_toyworld.config import BIASED_BASE_RECIPE, AblationConfig, DemoConfig, PretrainConfig, ToyAlignmentConfig


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
    from dina_lrm_toyworld.alignment import run_alignment_experiment

    config = load_settings(ToyAlignmentConfig, args.config, vars(args), args.set)
    run_alignment_experiment(args.out, config, overwrite=args.overwrite)
    print((Path(args.out) / "alignment.md").read_text())
    return 0


def run_toy_bias(args) -> int:
    from dina_lrm_toyworld.alignment import biased_base_recipe
    from dina_lrm_toyworld.pretrain import pretrain

    recipe = dataclasses.asdict(biased_base_recipe())
    pretrain(Path(args.out), load_settings(PretrainConfig, args.config, vars(args), args.set, defaults=recipe))
    print(f"Wrote the biased toy generator to {args.out}")
    return 0


def run_toy_ablations(args) -> int:
    from dina_lrm_toyworld.ablations import run_ablations

    config = load_settings(AblationConfig, args.config, vars(args), args.set)
    run_ablations(args.out, config, generator_dir=args.generator, overwrite=args.overwrite)
    print((Path(args.out) / "ablations.md").read_text())
    return 0


def run_demo(args) -> int:
    from dina_lrm_toyworld.demo import run_demo as demo

    flags = vars(args)
    if flags["data.seed"] is None:  # the demo's --seed seeds its data too, unless --data.seed says otherwise
        flags["data.seed"] = flags["seed"]
    config = load_settings(DemoConfig, args.config, flags, args.set)
    demo(Path(args.out), config, generator_dir=args.generator, from_scratch=args.from_scratch, overwrite=args.overwrite)
    return 0


def run_pretrain(args) -> int:
    from dina_lrm_toyworld.pretrain import pretrain

    pretrain(Path(args.out), load_settings(PretrainConfig, args.config, vars(args), args.set))
    print(f"Wrote the toy generator to {args.out} (load it with dina_lrm.pipelines.load_pipeline)")
    return 0


def add_settings(parser: argparse.ArgumentParser, cls: type, example: str, defaults=None) -> None:
    """--config, --set and one flag per setting of ``cls`` (its nested sections as dotted flags);
    ``defaults``: the instance whose values the help shows (a recipe's)."""
    parser.add_argument("--config", help=f"YAML with {cls.__name__} keys; the flags below override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a config key, e.g. {example}")
    add_config_arguments(parser, cls, sections=True, defaults=defaults)


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the toy world end to end: data, DiNa-LRM vs. baselines, report")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--generator", help="toy generator directory (default: the shipped one)")
    demo.add_argument("--from-scratch", action="store_true", help="pretrain the toy generator first (~65 min on 2 cores)")
    demo.add_argument("--overwrite", action="store_true", help="replace a demo with other settings in --out")
    add_settings(demo, DemoConfig, "data.flip_rate=0.3")
    demo.set_defaults(func=run_demo)

    toyworld = commands.add_parser("toyworld", help="the toy world's generator").add_subparsers(dest="action", required=True)
    pretrain = toyworld.add_parser("pretrain", help="train the toy VAE, text encoders and generator from scratch")
    pretrain.add_argument("--out", required=True)
    add_settings(pretrain, PretrainConfig, "generator.num_layers=6")
    pretrain.set_defaults(func=run_pretrain)
    toy_align = toyworld.add_parser("align", help="the alignment experiment: DiffusionNFT with the judge, DiNa-LRM and the pixel "
                                    "reward, ReFL with DiNa-LRM, on the biased toy generator after its gate, several seeds "
                                    "(see docs/alignment.md)")
    toy_align.add_argument("--out", default="demo_out/alignment")
    toy_align.add_argument("--overwrite", action="store_true", help="replace an earlier experiment in --out")
    add_settings(toy_align, ToyAlignmentConfig, "settings.nft.max_steps=20")
    toy_align.set_defaults(func=run_toy_align)
    bias = toyworld.add_parser("bias", help="the biased base: continue the shipped generator on renders that draw half of the "
                               "object groups in a confusion colour (the recipe of the shipped pretrained_biased)")
    bias.add_argument("--out", required=True)
    add_settings(bias, PretrainConfig, "generator_steps=200", defaults=PretrainConfig(**BIASED_BASE_RECIPE))
    bias.set_defaults(func=run_toy_bias)
    ablations = toyworld.add_parser("ablations", help="the paper's reward-model table in the toy world: every ablation row, "
                                    "several seeds, intervals (see docs/toyworld.md)")
    ablations.add_argument("--out", default="demo_out/ablations")
    ablations.add_argument("--generator", help="toy generator directory (default: the shipped one)")
    ablations.add_argument("--overwrite", action="store_true", help="replace earlier ablations in --out")
    add_settings(ablations, AblationConfig, "data.train_prompts=600")
    ablations.set_defaults(func=run_toy_ablations)
    benchmark = toyworld.add_parser("benchmark", help="write a judge-ranked toy benchmark (HPDv2 layout) for `dina-lrm eval`")
    benchmark.add_argument("--out", required=True)
    benchmark.add_argument("--prompts", type=int, default=40)
    benchmark.add_argument("--images-per-prompt", type=int, default=4)
    benchmark.add_argument("--seed", type=int, default=0)
    benchmark.set_defaults(func=run_toy_benchmark)
