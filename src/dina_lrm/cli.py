"""Command line: ``dina-lrm score | prepare | train | eval | serve | align | demo | toyworld pretrain | toyworld bias | toyworld align | toyworld ablations | toyworld benchmark``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import dina_lrm
from dina_lrm.config import DTYPE_NAMES, IMAGE_U, LATENT_U


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
        from dina_lrm.toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD

        args.reward, args.model = str(SHIPPED_REWARD), str(SHIPPED_GENERATOR)
    elif not (args.reward and args.model):
        raise ValueError("give --reward DIR (or hub id) and --model (its generator), or --toy")
    from dina_lrm.pipelines import DTYPES
    from dina_lrm.scorer import Scorer

    scorer = Scorer.from_pretrained(
        args.reward, args.model, device=args.device, dtype=DTYPES[args.dtype], max_sequence_length=args.max_sequence_length,
        autocast=args.autocast,
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
    from dina_lrm.data.prepare import PrepareConfig, prepare
    from dina_lrm.data.shards import read_index

    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    config = PrepareConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    index_path = prepare(config, overwrite=args.overwrite)
    if index_path is not None:
        from dina_lrm.data.records import ReadReport

        index = read_index(index_path.parent)
        print(f"{index['num_pairs']} pairs in {len(index['shards'])} shards at {index_path.parent}")
        print(ReadReport.from_dict(index["report"]).summary())
        print("buckets: " + ", ".join(f"{name} ({count})" for name, count in index["buckets"].items()))
    return 0


def run_train(args) -> int:
    from accelerate import PartialState

    from dina_lrm.config import load_config
    from dina_lrm.train.trainer import train

    final = train(load_config(args.config, args.set), resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:
        print(f"Wrote the reward model to {final}")
    return 0


EVAL_FLAGS = {
    "format": "format", "input": "input", "split": "split", "out": "out", "reward": "reward", "model": "model", "images_root": "images_root",
    "latent_cache": "latent_cache", "u": "u_values", "draws": "draws", "levels": "level_sets", "extra_reward": "extra_rewards",
    "batch_size": "batch_size", "seed": "seed", "resamples": "bootstrap_resamples", "skip_missing": "skip_missing",
    "allow_outside_root": "allow_outside_root", "min_confidence": "min_confidence", "min_vote_share": "min_vote_share",
    "protocol": "protocol", "tie_threshold": "tie_threshold",
    "device": "device", "dtype": "dtype", "max_sequence_length": "max_sequence_length", "reference_size": "reference_size",
}


def parse_levels(text: str) -> list[float]:
    try:
        return [float(u) for u in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated noise levels like 0.2,0.4,0.6, got {text!r}") from None


def config_from_args(args, flags: dict[str, str]) -> dict:
    """The ``--config`` YAML file's keys, overridden by the flags given (``flags``: flag -> key)."""
    import yaml

    raw = {}
    if args.config:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"{args.command} config not found: {args.config}")
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
    given = {flag: getattr(args, flag) for flag in flags}
    raw.update({key: given[flag] for flag, key in flags.items() if given[flag] is not None and given[flag] is not False})
    return raw


def run_eval(args) -> int:
    from dina_lrm.eval.runner import EvalConfig, evaluate

    raw = config_from_args(args, EVAL_FLAGS)
    summary = evaluate(EvalConfig.from_dict(raw), overwrite=args.overwrite)
    if summary is not None:
        print((Path(raw.get("out", EvalConfig.out)) / "report.md").read_text())
    return 0


SERVE_FLAGS = {name: name for name in (
    "reward", "model", "host", "port", "device", "dtype", "autocast", "compile", "max_batch_size", "max_wait_ms", "max_request_mb", "default_u",
    "max_sequence_length", "max_prompts", "max_prompt_chars", "idle_timeout_s", "header_timeout_s", "body_timeout_s",
    "max_connections", "backlog", "api_key",
)}


def run_serve(args) -> int:
    from dina_lrm.serve.server import ServeConfig, serve

    serve(ServeConfig.from_dict(config_from_args(args, SERVE_FLAGS)))
    return 0


def run_align(args) -> int:
    from accelerate import PartialState

    from dina_lrm.align.config import AlignConfig
    from dina_lrm.align.trainer import align
    from dina_lrm.config import apply_overrides

    raw = config_from_args(args, {"out": "out", "max_steps": "max_steps"})
    history = align(AlignConfig.from_dict(apply_overrides(raw, args.set)), resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:
        first, last = history[0], history[-1]
        out = Path(raw.get("out", "align_out"))
        judged = ""
        if "eval_judge" in last:
            best = json.loads((out / "summary.json").read_text())["best"]
            judged = f", judge {first['eval_judge']:.3f} -> {last['eval_judge']:.3f} (best {best['eval_judge']:.3f} at step {best['step']}, in {out / 'best'})"
        print(f"{last['step']} steps: validation reward {first['eval_reward']:.3f} -> {last['eval_reward']:.3f}{judged}; "
              f"LoRA in {out / 'lora'}")
    return 0


def run_toy_benchmark(args) -> int:
    from dina_lrm.toyworld.benchmark import write_toy_benchmark

    path = write_toy_benchmark(args.out, prompts=args.prompts, images_per_prompt=args.images_per_prompt, seed=args.seed)
    print(f"Wrote {path} (HPDv2 layout). Evaluate with: dina-lrm eval --format hpdv2 --input {path} --reward REWARD --model GENERATOR")
    return 0


def run_toy_align(args) -> int:
    from dina_lrm.config import apply_overrides, from_dict
    from dina_lrm.toyworld.alignment import ToyAlignmentConfig, run_alignment_experiment

    raw = apply_overrides({k: getattr(args, k) for k in ("base", "seeds", "runs") if getattr(args, k)}, args.set)
    run_alignment_experiment(args.out, from_dict(ToyAlignmentConfig, raw), overwrite=args.overwrite)
    print((Path(args.out) / "alignment.md").read_text())
    return 0


def run_toy_bias(args) -> int:
    from dina_lrm.config import apply_overrides
    from dina_lrm.toyworld.alignment import biased_base_recipe
    from dina_lrm.toyworld.pretrain import pretrain

    pretrain(Path(args.out), biased_base_recipe(**apply_overrides({}, args.set)))
    print(f"Wrote the biased toy generator to {args.out}")
    return 0


def run_toy_ablations(args) -> int:
    from dina_lrm.config import apply_overrides, from_dict
    from dina_lrm.toyworld.ablations import AblationConfig, run_ablations

    raw = apply_overrides({k: getattr(args, k) for k in ("seeds", "rows", "steps") if getattr(args, k)}, args.set)
    run_ablations(args.out, from_dict(AblationConfig, raw), generator_dir=args.generator, overwrite=args.overwrite)
    print((Path(args.out) / "ablations.md").read_text())
    return 0


def run_demo(args) -> int:
    from dina_lrm.toyworld.demo import DemoConfig
    from dina_lrm.toyworld.demo import run_demo as demo
    from dina_lrm.toyworld.preferences import PreferenceDataConfig

    data = {k: getattr(args, k) for k in ("train_prompts", "test_prompts", "flip_rate") if getattr(args, k) is not None}
    demo_options = {"steps": args.steps} if args.steps is not None else {}
    config = DemoConfig(data=PreferenceDataConfig(seed=args.seed, **data), seed=args.seed, **demo_options)
    demo(Path(args.out), config, generator_dir=args.generator, from_scratch=args.from_scratch, overwrite=args.overwrite)
    return 0


def run_sample(args) -> int:
    prompts = [args.prompt] if args.prompt else [p.strip() for p in Path(args.prompts).read_text().splitlines() if p.strip()] if args.prompts else []
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    if args.toy:
        if args.reward or args.model:
            raise ValueError("--toy picks the shipped toy reward model and generator; leave out --reward and --model")
        from dina_lrm.toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD
        from dina_lrm.toyworld.generator import T5_TOKENS

        args.reward, args.model = str(SHIPPED_REWARD), str(SHIPPED_GENERATOR)
        args.max_sequence_length = args.max_sequence_length or T5_TOKENS
    elif not (args.reward and args.model):
        raise ValueError("give --reward DIR (or hub id) and --model (its generator), or --toy")
    from dina_lrm.outputs import claim_output
    from dina_lrm.pipelines import DTYPES, load_pipeline
    from dina_lrm.search import Searcher, SearchConfig, write_results

    options = {k: getattr(args, k) for k in ("strategy", "n", "keep", "at", "steps", "guidance_scale", "max_sequence_length", "seed")
               if getattr(args, k) is not None}
    config = SearchConfig(**options)
    config.validate()
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


def run_pretrain(args) -> int:
    from dina_lrm.toyworld.pretrain import PretrainConfig, pretrain

    overrides = {k: getattr(args, k) for k in ("vae_steps", "generator_steps", "dataset_size", "vae_from", "generator_from", "save_dtype") if getattr(args, k) is not None}
    pretrain(Path(args.out), PretrainConfig(seed=args.seed, **overrides))
    print(f"Wrote the toy generator to {args.out} (load it with dina_lrm.pipelines.load_pipeline)")
    return 0


def add_row_filters(parser: argparse.ArgumentParser) -> None:
    """HPDv3's row filters, the same for prepare and eval."""
    parser.add_argument("--min-confidence", type=float, help="HPDv3: keep rows with confidence >= this (HPSv3's 7B config: 0.95)")
    parser.add_argument("--min-vote-share", type=float, help="HPDv3: keep rows whose chosen image's vote share is above this "
                        "(the authors' data tool: 0.6)")


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
    score.add_argument("--autocast", choices=["bf16", "fp16"], help="run the backbone in half precision, the head in --dtype")
    score.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the number the reward model was trained with)")
    score.add_argument("--json", action="store_true", help="machine-readable output")
    score.set_defaults(func=run_score)

    prepare = commands.add_parser("prepare", help="encode a preference dataset into latent shards for training")
    prepare.add_argument("--format", required=True, help="pickapic, hpdv3, imagereward or generic")
    prepare.add_argument("--input", required=True, help="dataset file or directory (see docs/data.md)")
    prepare.add_argument("--out", required=True, help="shard directory to write (rerun with the same settings to resume)")
    prepare.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier prepare with other settings in --out")
    prepare.add_argument("--model", required=True, help="generator pipeline whose VAE encodes the images")
    prepare.add_argument("--images-root", help="where relative image paths start (default: the dataset file's folder)")
    prepare.add_argument("--split", help="one split of a parquet dataset folder, e.g. train or validation_unique (Pick-a-Pic)")
    prepare.add_argument("--hard-labels", dest="soft_labels", action="store_false", default=None,
                         help="HPDv3: target 1 for path1 instead of HPSv3's soft label from choice_dist")
    add_row_filters(prepare)
    prepare.add_argument("--reference-size", type=int, help="bucket area = SIZE^2 pixels (default: the generator's native size)")
    prepare.add_argument("--bucket-step", type=int, help="bucket side step in pixels (default: 4 x VAE factor x patch size)")
    prepare.add_argument("--batch-size", type=int, help="images per VAE call (default 16)")
    prepare.add_argument("--groups-per-shard", type=int, help="prompt groups per shard: the unit of resume and of the rank split (default 512)")
    prepare.add_argument("--cache-prompt-embeds", action="store_true", help="store text embeddings so training skips the text encoders")
    prepare.add_argument("--max-sequence-length", type=int, help="T5 tokens when caching embeddings (default 128)")
    prepare.add_argument("--dtype", choices=DTYPE_NAMES, help="VAE precision (default float32)")
    prepare.set_defaults(func=run_prepare)

    train = commands.add_parser("train", help="train DiNa-LRM on prepared shards (run under `accelerate launch` for several GPUs)")
    train.add_argument("--config", required=True, help="YAML (or the release's JSON) training configuration")
    train.add_argument("--resume", help="'latest' (the newest checkpoint that verifies) or a checkpoint directory to continue from")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run directory")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. training.max_steps=100")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("eval", help="pairwise accuracy on a benchmark, with intervals, ensembles, costs and plots "
                                   "(run under `accelerate launch` for several GPUs)")
    evaluate.add_argument("--config", help="YAML with EvalConfig keys; flags override it")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    evaluate.add_argument("--format", help="hpdv2, imagereward, hpdv3, genai_bench, pickapic or generic (see docs/eval.md)")
    evaluate.add_argument("--input", help="the benchmark's annotation file or parquet directory")
    evaluate.add_argument("--split", help="one split of a parquet dataset folder: test_unique (Pick-a-Pic, what PickScore reports), test_v1 (GenAI-Bench v1)")
    evaluate.add_argument("--images-root", help="where relative image paths start (default: the annotation file's folder)")
    evaluate.add_argument("--protocol", choices=("both", "ours", "official"),
                          help="accuracy columns: ours (one rule for every benchmark), official (the benchmark's own "
                               "metric: HPSv2 inversion, ImageReward, PickScore, GenAI-Bench 4-way) or both (default)")
    evaluate.add_argument("--tie-threshold", type=float, help="official Pick-a-Pic / GenAI-Bench metric: predict a tie when "
                          "|P(a) - P(b)| <= this (PickScore picks it on validation_unique; default 0)")
    add_row_filters(evaluate)
    evaluate.add_argument("--out", help="report directory (default eval_out)")
    evaluate.add_argument("--reward", help="DiNa-LRM reward model directory")
    evaluate.add_argument("--model", help="the reward model's generator pipeline: local directory or hub id")
    evaluate.add_argument("--extra-reward", action="append", metavar="MODULE:ATTR",
                          help="another reward model for the table: a RewardFn (or a factory of one) in a module or .py file")
    evaluate.add_argument("--latent-cache", help="where encoded latents are kept between runs (default OUT/latents)")
    evaluate.add_argument("--u", type=float, nargs="+", help="noise levels scored one by one (default 0.1 ... 0.8)")
    evaluate.add_argument("--draws", type=int, nargs="+", help="noise-draw ensembles at the best u (default 2 4 8)")
    evaluate.add_argument("--levels", type=parse_levels, nargs="+", metavar="U1,U2,...",
                          help="multi-level ensembles (default 0.2,0.6 0.2,0.4,0.6 0.2,0.4,0.6,0.8)")
    evaluate.add_argument("--batch-size", type=int, help="images per scoring call (default 32)")
    evaluate.add_argument("--seed", type=int, help="noise and bootstrap seed (default 0)")
    evaluate.add_argument("--resamples", type=int, help="bootstrap resamples (default 1000)")
    evaluate.add_argument("--skip-missing", action="store_true", help="evaluate without missing or unreadable images")
    evaluate.add_argument("--allow-outside-root", action="store_true", help="read image paths that lead outside the images root (absolute, ../)")
    evaluate.add_argument("--device", help="default: this process's accelerator")
    evaluate.add_argument("--dtype", choices=DTYPE_NAMES)
    evaluate.add_argument("--max-sequence-length", type=int, help="T5 tokens, as the reward model was trained (default 128)")
    evaluate.add_argument("--reference-size", type=int, help="encode at buckets of about SIZE^2 pixels (default: the generator's)")
    evaluate.set_defaults(func=run_eval)

    sample = commands.add_parser("sample", help="reward-guided sampling: start N candidates, prune them on their noisy latents "
                                 "with the reward, finish the best (see docs/search.md)")
    sample.add_argument("--reward", help="DiNa-LRM directory or hub id (of the generator's backbone)")
    sample.add_argument("--model", help="the generator pipeline (SD3 / SD3.5): local directory or hub id")
    sample.add_argument("--toy", action="store_true", help="the shipped toy reward and generator")
    sample.add_argument("--prompt", help="one prompt")
    sample.add_argument("--prompts", help="a text file, one prompt per line")
    sample.add_argument("--strategy", choices=["best_of_n", "prune", "beam"], help="default prune")
    sample.add_argument("--n", type=int, help="candidates per prompt (default 16)")
    sample.add_argument("--keep", type=int, help="survivors after the last checkpoint (default 4)")
    sample.add_argument("--at", type=parse_levels, help="checkpoint sigmas, decreasing, e.g. 0.6,0.3 (default)")
    sample.add_argument("--steps", type=int, help="sampling steps (default 28)")
    sample.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 4.5)")
    sample.add_argument("--max-sequence-length", type=int, help="T5 tokens of the generator's text (default 128; --toy: the toy's)")
    sample.add_argument("--seed", type=int, help="prompt i uses seed + i (default 0)")
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    sample.add_argument("--out", required=True, help="folder for the images, search.json and contact_sheet.png")
    sample.add_argument("--overwrite", action="store_true", help="replace an earlier sample run with other settings in --out")
    sample.set_defaults(func=run_sample)

    serve = commands.add_parser("serve", help="HTTP reward server for latents, micro-batched (see docs/serving.md)")
    serve.add_argument("--config", help="YAML with ServeConfig keys; flags override it")
    serve.add_argument("--reward", "--model-path", dest="reward",
                       help="reward model directory (config.json + checkpoint/); --model-path is verl-omni's name for it")
    serve.add_argument("--model", "--base-model-path", dest="model",
                       help="generator pipeline: local directory or hub id; --base-model-path is verl-omni's name for it")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; another address without --api-key warns)")
    serve.add_argument("--port", type=int, help="default 8000; 0 picks a free port (printed at start)")
    serve.add_argument("--device", help="default cpu")
    serve.add_argument("--dtype", choices=DTYPE_NAMES, help="default float32")
    serve.add_argument("--autocast", choices=["bf16", "fp16"], help="run the backbone in half precision, the head in --dtype")
    serve.add_argument("--compile", action="store_true", default=None, help="torch.compile the kept blocks")
    serve.add_argument("--max-batch-size", type=int, help="items per backbone pass (default 8)")
    serve.add_argument("--max-wait-ms", type=float, help="how long a request may wait for others to batch with (default 10)")
    serve.add_argument("--max-request-mb", type=float, help="larger request bodies get HTTP 413 (default 64)")
    serve.add_argument("--default-u", type=float, help=f"noise level when a request gives none (default {LATENT_U})")
    serve.add_argument("--max-sequence-length", type=int, help="T5 tokens when the server encodes prompts (default: the model's own)")
    serve.add_argument("--max-prompts", type=int, help="prompts per request; more get HTTP 413 (default 256)")
    serve.add_argument("--max-prompt-chars", type=int, help="characters per prompt; longer get HTTP 413 (default 2000)")
    serve.add_argument("--idle-timeout-s", type=float, help="close a connection that sends no request for this long (default 30)")
    serve.add_argument("--header-timeout-s", type=float, help="request line and headers must arrive within this (default 10)")
    serve.add_argument("--body-timeout-s", type=float, help="the body must arrive within this, else HTTP 408 (default 60)")
    serve.add_argument("--max-connections", type=int, help="open connections; more get HTTP 503 (default 256)")
    serve.add_argument("--backlog", type=int, help="listen queue length (default 128)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /healthz "
                       "(default: $DINA_LRM_API_KEY; none: no authentication)")
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
    return parser


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
