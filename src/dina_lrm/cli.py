"""Command line: ``dina-lrm score | prepare | train | eval | serve | align | sample``, and the commands
that packages register under the ``dina_lrm.commands`` entry point (the toy world: ``demo``,
``toyworld ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

import dina_lrm
from dina_lrm.config import AUTOCAST_NAMES, DTYPE_NAMES, IMAGE_U, TEXT_ENCODER_MODES, DiNaConfig, add_config_arguments, load_settings, parse_levels
from dina_lrm.data.config import PrepareConfig
from dina_lrm.eval.config import EvalConfig
from dina_lrm.search_config import SearchConfig
from dina_lrm.serve.config import ServeConfig

COMMANDS_GROUP = "dina_lrm.commands"  # each entry point: add_commands(subparsers)
TOY_MODELS_GROUP = "dina_lrm.toy_models"


def read_pairs(path: Path, images_root: Path | None = None) -> list[tuple[str, str]]:
    """(prompt, image path) rows from a CSV (header ``prompt,image``), JSONL or JSON file; relative image
    paths are resolved against ``images_root``, by default the file's own folder."""
    from dina_lrm.data.rows import read_rows

    rows = read_rows(path, "pairs file")
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not row.get("prompt") or not row.get("image"):
            raise ValueError(f"{path}, row {number}: needs non-empty 'prompt' and 'image' fields, got {row}")
        pairs.append((row["prompt"], str(((images_root or path.parent) / row["image"]).resolve())))
    if not pairs:
        raise ValueError(f"{path} holds no rows")
    return pairs


def score_inputs(args) -> list[tuple[str, str]]:
    """(prompt, image path) pairs from --pairs or --prompt + IMAGEs, every image checked to exist."""
    if args.pairs and (args.prompt or args.images):
        raise ValueError("give --pairs FILE, or --prompt with IMAGE paths, not both")
    if args.images_root and not args.pairs:
        raise ValueError("--images-root applies to the image paths of a --pairs file")
    if args.pairs:
        pairs = read_pairs(Path(args.pairs), Path(args.images_root) if args.images_root else None)
    elif args.prompt and args.images:
        pairs = [(args.prompt, image) for image in args.images]
    else:
        raise ValueError("give --prompt and IMAGE paths, or --pairs FILE")
    missing = [image for _, image in pairs if not Path(image).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"image not found: {missing[0]}{more}")
    return pairs


def run_score(args) -> int:
    from dina_lrm.noise import check_noise_levels

    pairs = score_inputs(args)  # before any model loads: a typo should not cost minutes
    check_noise_levels(args.noise_levels or [args.u])
    if args.toy:
        if args.reward or args.model:
            raise ValueError("--toy picks the shipped toy reward model and generator; leave out --reward and --model")
        toy = toy_models()
        args.reward, args.model = toy["reward"], toy["model"]
    elif not (args.reward and args.model):
        raise ValueError("give --reward DIR (or hub id) and --model (its generator), or --toy")
    from dina_lrm.pipelines import DTYPES
    from dina_lrm.scorer import Scorer

    scorer = Scorer.from_pretrained(
        args.reward, args.model, device=args.device, dtype=DTYPES[args.dtype], max_sequence_length=args.max_sequence_length,
        autocast=args.autocast, text_encoders=args.text_encoders,
    )
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


def run_prepare(args) -> int:
    from dina_lrm.data.prepare import prepare
    from dina_lrm.data.shards import read_index

    index_path = prepare(load_settings(PrepareConfig, args.config, vars(args), args.set), overwrite=args.overwrite)
    if index_path is not None:
        from dina_lrm.data.records import ReadReport

        index = read_index(index_path.parent)
        print(f"{index['num_pairs']} pairs in {len(index['shards'])} shards at {index_path.parent}")
        print(ReadReport.from_dict(index["report"]).summary())
        print("buckets: " + ", ".join(f"{name} ({count})" for name, count in index["buckets"].items()))
    return 0


def run_train(args) -> int:
    from accelerate import PartialState

    from dina_lrm.train.trainer import train

    final = train(load_settings(DiNaConfig, args.config, vars(args), args.set), resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:
        print(f"Wrote the reward model to {final}")
    return 0


def run_eval(args) -> int:
    from dina_lrm.eval.runner import evaluate

    config = load_settings(EvalConfig, args.config, vars(args), args.set)
    if evaluate(config, overwrite=args.overwrite) is not None:
        print((Path(config.out) / "report.md").read_text())
    return 0


def run_serve(args) -> int:
    from dina_lrm.serve.server import serve

    serve(load_settings(ServeConfig, args.config, vars(args), args.set))
    return 0


def run_align(args) -> int:
    from accelerate import PartialState

    from dina_lrm.align.config import AlignConfig
    from dina_lrm.align.trainer import align

    config = load_settings(AlignConfig, args.config, {"out": args.out, "max_steps": args.max_steps}, args.set)
    history = align(config, resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:
        first, last = history[0], history[-1]
        out = Path(config.out)
        judged = ""
        if "eval_judge" in last:
            best = json.loads((out / "summary.json").read_text())["best"]
            judged = f", judge {first['eval_judge']:.3f} -> {last['eval_judge']:.3f} (best {best['eval_judge']:.3f} at step {best['step']}, in {out / 'best'})"
        print(f"{last['step']} steps: validation reward {first['eval_reward']:.3f} -> {last['eval_reward']:.3f}{judged}; "
              f"LoRA in {out / 'lora'}")
    return 0


def run_sample(args) -> int:
    prompts = [args.prompt] if args.prompt else [p.strip() for p in Path(args.prompts).read_text().splitlines() if p.strip()] if args.prompts else []
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    if args.toy:
        if args.reward or args.model:
            raise ValueError("--toy picks the shipped toy reward model and generator; leave out --reward and --model")
        toy = toy_models()
        args.reward, args.model = toy["reward"], toy["model"]
        args.max_sequence_length = args.max_sequence_length or toy["max_sequence_length"]
    elif not (args.reward and args.model):
        raise ValueError("give --reward DIR (or hub id) and --model (its generator), or --toy")
    from dina_lrm.outputs import claim_output
    from dina_lrm.pipelines import DTYPES, load_pipeline
    from dina_lrm.search import Searcher, write_results

    config = load_settings(SearchConfig, None, vars(args))
    out = Path(args.out)
    claim_output(out, "sample", {"config": vars(config), "prompts": prompts, "reward": args.reward, "model": args.model},
                 ["*.png", "search.json"], overwrite=args.overwrite)
    pipe = load_pipeline(args.model, DTYPES[args.dtype]).to(args.device)
    searcher = Searcher.from_pretrained(args.reward, pipe, config)
    results = [searcher.run(prompt, seed=config.seed + i, progress=True) for i, prompt in enumerate(prompts)]
    paths = write_results(results, pipe.vae, out, config)
    calls = sum(r.transformer_calls for r in results)
    print(f"Wrote {len(paths)} images, search.json and contact_sheet.png to {out} ({calls} candidate steps through the generator)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dina-lrm", description="Diffusion-native latent reward models.")
    parser.add_argument("--version", action="version", version=f"dina-lrm {dina_lrm.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score prompt/image pairs with a trained reward model")
    score.add_argument("--reward", help="reward model: directory (config.json + checkpoint/) or hub id")
    score.add_argument("--model", help="generator pipeline: local directory or hub id")
    score.add_argument("--toy", action="store_true", help="the shipped toy reward model on the shipped toy generator: "
                       "try scoring right after install (toy-world images, 64x64)")
    score.add_argument("--prompt", help="one prompt for all IMAGE arguments")
    score.add_argument("images", nargs="*", metavar="IMAGE")
    score.add_argument("--pairs", help="CSV (prompt,image header) or JSONL file of pairs; relative image paths start at "
                       "--images-root, by default the file's folder")
    score.add_argument("--images-root", help="where the relative image paths of --pairs start (default: the file's folder)")
    score.add_argument("--u", type=float, default=IMAGE_U, help=f"noise level to score at (default {IMAGE_U}: images from files read best a little noised)")
    score.add_argument("--noise-levels", type=parse_levels, help="ensemble over these comma-separated noise levels, e.g. 0.2,0.5,0.7")
    score.add_argument("--n-draws", type=int, default=1, help="average this many noise draws")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--device", default="cpu")
    score.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    score.add_argument("--autocast", choices=AUTOCAST_NAMES, help="run the backbone in half precision, the head in --dtype")
    score.add_argument("--text-encoders", choices=[m for m in TEXT_ENCODER_MODES if m != "none"], default="device",
                       help="where CLIP / T5 live while prompts encode: device or cpu (serve and the API also take none)")
    score.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the number the reward model was trained with)")
    score.add_argument("--json", action="store_true", help="machine-readable output")
    score.set_defaults(func=run_score)

    prepare = commands.add_parser("prepare", help="encode a preference dataset into latent shards for training")
    prepare.add_argument("--config", help="YAML with PrepareConfig keys; flags override it")
    prepare.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier prepare with other settings in --out")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. batch_size=8")
    add_config_arguments(prepare, PrepareConfig)
    prepare.set_defaults(func=run_prepare)

    train = commands.add_parser("train", help="train DiNa-LRM on prepared shards (run under `accelerate launch` for several GPUs)")
    train.add_argument("--config", help="YAML (or the release's JSON) training configuration; the flags below override it")
    train.add_argument("--resume", help="'latest' (the newest checkpoint that verifies) or a checkpoint directory to continue from")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run directory")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. training.max_steps=100")
    add_config_arguments(train, DiNaConfig, sections=True)
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("eval", help="pairwise accuracy on a benchmark, with intervals, ensembles, costs and plots "
                                   "(run under `accelerate launch` for several GPUs)")
    evaluate.add_argument("--config", help="YAML with EvalConfig keys; flags override it")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. batch_size=16")
    add_config_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(func=run_eval)

    sample = commands.add_parser("sample", help="reward-guided sampling: start N candidates, prune them on their noisy latents "
                                 "with the reward, finish the best (see docs/search.md)")
    sample.add_argument("--reward", help="DiNa-LRM directory or hub id (of the generator's backbone)")
    sample.add_argument("--model", help="the generator pipeline (SD3 / SD3.5): local directory or hub id")
    sample.add_argument("--toy", action="store_true", help="the shipped toy reward and generator")
    sample.add_argument("--prompt", help="one prompt")
    sample.add_argument("--prompts", help="a text file, one prompt per line")
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    sample.add_argument("--out", required=True, help="folder for the images, search.json and contact_sheet.png")
    sample.add_argument("--overwrite", action="store_true", help="replace an earlier sample run with other settings in --out")
    add_config_arguments(sample, SearchConfig)
    sample.set_defaults(func=run_sample)

    serve = commands.add_parser("serve", help="HTTP reward server for latents, micro-batched (see docs/serving.md)")
    serve.add_argument("--config", help="YAML with ServeConfig keys; flags override it")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. max_batch_size=16")
    add_config_arguments(serve, ServeConfig)
    serve.set_defaults(func=run_serve)

    aligner = commands.add_parser("align", help="align a generator's LoRA with a reward: Flow-GRPO, ReFL or DRaFT-K "
                                  "(run under `accelerate launch` for several GPUs; see docs/alignment.md)")
    aligner.add_argument("--config", required=True, help="YAML with AlignConfig keys")
    aligner.add_argument("--out", help="output directory (default align_out)")
    aligner.add_argument("--max-steps", type=int, help="(default: the config's)")
    aligner.add_argument("--resume", help="'latest' (the newest checkpoint that verifies) or a checkpoint directory to continue from")
    aligner.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    aligner.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. reward.u=0.3")
    aligner.set_defaults(func=run_align)

    for plugin in entry_points(group=COMMANDS_GROUP):  # e.g. the toy world's `demo` and `toyworld` commands
        plugin.load()(commands)
    return parser


def toy_models() -> dict:
    """The shipped toy reward model and generator (``reward``, ``model``, ``max_sequence_length``), from
    the toy world's entry point."""
    found = entry_points(group=TOY_MODELS_GROUP, name="shipped")
    if not found:
        raise ValueError("--toy needs the toy world: pip install 'dina-lrm[toyworld]'")
    return next(iter(found)).load()()


class QuietTorchvisionFallback(logging.Filter):
    """transformers warns on every command that torchvision is missing and that it falls back to PIL
    image processors; no dina-lrm path uses those processors, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(QuietTorchvisionFallback())
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, FloatingPointError) as err:  # the user's input; a library bug keeps its traceback
        print(f"dina-lrm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
