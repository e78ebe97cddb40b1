"""``dina-lrm eval``: one benchmark, any reward models, one protocol, one report.

Images are encoded once into a latent cache (reused by later runs). Prompt groups are cut into
batches in dataset order; under ``accelerate launch`` batch ``b`` runs on rank ``b % world``, and
each batch's noise is seeded by its index, so every score is the same whatever the number of
processes. Scoring runs in two phases: per-u settings (and any other reward models) first, then
the ensembles (noise draws at the best u, and multi-level sets).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dina_lrm.config import import_object
from dina_lrm.data.config import PrepareConfig
from dina_lrm.data.prepare import open_image
from dina_lrm.data.readers import LabelRules, dataset_units, read_units, unit_files
from dina_lrm.data.records import PreferenceGroup
from dina_lrm.distributed import cpu_only
from dina_lrm.eval.config import EvalConfig
from dina_lrm.eval.cost import scoring_flops
from dina_lrm.memory import MemoryMeter
from dina_lrm.eval.latent_cache import build_latent_cache, decode_latent, load_latent_cache
from dina_lrm.eval.official import OFFICIAL_METRICS, official_accuracy
from dina_lrm.eval.protocol import Census, PairIndex, accuracy_summary, calibration
from dina_lrm.rewards import DiNaReward, Reward, Setting, check_reward
from dina_lrm.outputs import claim_output


TIE_COUNTING_FORMATS = ("pickapic", "genai_bench")  # their own metrics score human ties too
DOCUMENTED_ROOTS = {  # where each release keeps the images its annotation file names (docs/eval.md)
    "hpdv2": "the release's test/ folder (--images-root HPDv2/test)",
    "imagereward": "the test_images/ folder of ImageReward's data (--images-root ImageReward/data/test_images)",
    "hpdv3": "the release's root, which holds images/ (--images-root HPDv3)",
}


# Benchmark input ------------------------------------------------------------------------------


def image_problems(groups: list[PreferenceGroup]) -> list[tuple[str, str, str]]:
    """(group id, image id, reason) for every image file that is missing or not an image."""
    problems = []
    for group in groups:
        for source, image_id in zip(group.images, group.image_ids):
            if isinstance(source, bytes):
                continue
            if not Path(source).is_file():
                problems.append((group.group_id, image_id, "missing"))
                continue
            try:
                with Image.open(source):
                    pass
            except (UnidentifiedImageError, OSError):
                problems.append((group.group_id, image_id, "unreadable"))
    return problems


def images_root(config: EvalConfig) -> Path:
    """Where the benchmark's images must lie: ``images_root``, else the dataset's own folder."""
    if config.images_root:
        return Path(config.images_root)
    return Path(config.input) if Path(config.input).is_dir() else Path(config.input).parent


def images_outside(groups: list[PreferenceGroup], root: Path) -> list[tuple[str, str]]:
    """(group id, image id) of every image file whose path leads outside ``root`` (absolute
    elsewhere, or through ``..``). Judged on the path as written: links the user put inside the
    root (a symlinked image folder) are the user's choice and stay allowed."""
    root = Path(os.path.abspath(root))
    return [(group.group_id, image_id) for group in groups for source, image_id in zip(group.images, group.image_ids)
            if not isinstance(source, bytes) and not Path(os.path.abspath(source)).is_relative_to(root)]


def without_images(groups: list[PreferenceGroup], bad: set[tuple[str, str]], keep=lambda group: bool(group.pairs())) -> list[PreferenceGroup]:
    """``groups`` without the ``(group id, image id)`` images; a group that ``keep`` refuses then goes."""
    kept = []
    for group in groups:
        index = [i for i, image_id in enumerate(group.image_ids) if (group.group_id, image_id) not in bad]
        if len(index) < len(group.images):
            group = PreferenceGroup(group.group_id, group.prompt, [group.images[i] for i in index], [group.ranks[i] for i in index],
                                    group.confidence, [group.image_ids[i] for i in index], group.source, group.label)
        if keep(group):
            kept.append(group)
    return kept


def read_benchmark(config: EvalConfig, out: Path, state: PartialState) -> tuple[list[PreferenceGroup], Census]:
    rules = LabelRules(min_confidence=config.min_confidence, min_vote_share=config.min_vote_share)
    units = dataset_units(config.format, config.input, config.images_root, split=config.split, rules=rules)
    groups, report = read_units(units)
    census = Census.of(groups, report)
    census.split, census.files = config.split, unit_files(units)
    duplicated = len(groups) - len({g.group_id for g in groups})
    if duplicated:
        raise ValueError(f"{config.input}: {duplicated} prompt groups share an id; group ids must be unique")
    counts_ties = config.protocol != "ours" and config.format in TIE_COUNTING_FORMATS

    def scored(group: PreferenceGroup) -> bool:
        """A group with a comparable pair, or a human tie that the benchmark's own metric counts."""
        return bool(group.pairs()) or (counts_ties and len(group.images) == 2)

    groups = [g for g in groups if scored(g)]
    root = images_root(config)
    outside = images_outside(groups, root)
    census.images_outside_root = len(outside)
    if outside and not config.allow_outside_root:
        shown = ", ".join(image_id for _, image_id in outside[:3])
        raise ValueError(f"{len(outside)} images of the benchmark lie outside the images root {root} (absolute paths or ../; "
                         f"e.g. {shown}); pass --images-root, or --allow-outside-root to read them anyway")
    problems = image_problems(groups)
    if problems:
        listing = out / "missing_images.txt"
        if state.is_main_process:
            listing.write_text("".join(f"{g}\t{i}\t{why}\n" for g, i, why in problems))
        if not config.skip_missing:
            shown = ", ".join(f"{i} ({why})" for _, i, why in problems[:5])
            every = len(problems) == sum(not isinstance(image, bytes) for g in groups for image in g.images)
            hint = (f" Every image is missing: is the images root right? {config.format} images usually live in "
                    f"{DOCUMENTED_ROOTS[config.format]}." if every and config.format in DOCUMENTED_ROOTS else "")
            raise FileNotFoundError(
                f"{len(problems)} images of the benchmark are missing or unreadable (e.g. {shown}); all are listed in "
                f"{listing}. Fix --images-root, or pass --skip-missing to evaluate without them.{hint}"
            )
        kept = without_images(groups, {(g, i) for g, i, _ in problems}, keep=scored)
        census.missing_images, census.groups_dropped_for_missing = len(problems), len(groups) - len(kept)
        groups = kept
    comparable = [g for g in groups if g.pairs()]
    if not comparable:
        raise ValueError(f"{config.input} holds no comparable pair (census: {asdict(census)})")
    census.prompts, census.images = len(comparable), sum(len(g.images) for g in comparable)
    census.pairs = sum(len(g.pairs()) for g in comparable)
    census.tied_groups_scored = len(groups) - len(comparable)
    return groups, census


def load_extra_reward(spec: str) -> Reward:
    """``module:attr`` or ``path/file.py:attr``: a :class:`~dina_lrm.rewards.Reward`, or a callable that returns one."""
    reward = import_object(spec, "--extra-reward")
    reward = reward() if not isinstance(reward, Reward) and callable(reward) else reward
    return check_reward(reward, f"--extra-reward {spec!r}")


# Scoring ----------------------------------------------------------------------------------


def make_batches(groups: list[PreferenceGroup], batch_size: int) -> list[list[int]]:
    """Whole prompt groups (by index), in dataset order, about ``batch_size`` images a batch."""
    batches, current, images = [], [], 0
    for number, group in enumerate(groups):
        current.append(number)
        images += len(group.images)
        if images >= batch_size:
            batches.append(current)
            current, images = [], 0
    return batches + ([current] if current else [])


class BenchmarkInputs:
    """The prompts, latents and images of one batch of prompt groups."""

    def __init__(self, groups: list[PreferenceGroup], latents: dict | None):
        self.groups = groups
        self.latents = latents

    def prompts(self, batch: list[int]) -> list[str]:
        return [self.groups[g].prompt for g in batch for _ in self.groups[g].images]

    def items(self, batch: list[int], kind: str) -> list:
        if kind == "latents":
            return [decode_latent(self.latents[(self.groups[g].group_id, i)]) for g in batch for i in range(len(self.groups[g].images))]
        return [open_image(source) for g in batch for source in self.groups[g].images]


def batch_seed(seed: int, batch_index: int) -> int:
    return seed * 100_003 + batch_index


def score_locally(fns: list, batches: list[list[int]], inputs: BenchmarkInputs, config: EvalConfig, state: PartialState) -> dict:
    """This rank's share: per reward fn, its scores by batch index, scoring seconds, images and peak memory."""
    mine = [b for b in range(len(batches)) if b % state.num_processes == state.process_index]
    results = {}
    for fn in fns:
        scores, seconds, images = {}, 0.0, 0
        with MemoryMeter(state.device) as meter:
            for b in tqdm(mine, desc=fn.name, disable=not state.is_local_main_process, leave=False):
                prompts, items = inputs.prompts(batches[b]), inputs.items(batches[b], fn.inputs)
                start = time.perf_counter()
                with torch.no_grad():
                    values = torch.as_tensor(fn(items, prompts, seed=batch_seed(config.seed, b))).double().cpu().numpy().reshape(-1)
                seconds += time.perf_counter() - start
                if len(values) != len(items):
                    raise ValueError(f"{fn.name} returned {len(values)} scores for {len(items)} images")
                if not np.isfinite(values).all():
                    raise FloatingPointError(f"{fn.name} returned NaN or inf scores (batch {b}); refusing to report an accuracy")
                scores[b], images = values, images + len(items)
        results[fn.name] = {"scores": scores, "seconds": seconds, "images": images, "peak_mib": meter.peak_mib}
    return results


def gather_scores(local: dict, batches: list[list[int]], state: PartialState) -> dict:
    """All ranks' results, merged: flat scores in dataset order and the cost of each reward fn."""
    parts = gather_object([local]) if state.num_processes > 1 else [local]
    merged = {}
    for name in local:
        by_batch = {b: s for part in parts for b, s in part[name]["scores"].items()}
        seconds = max(part[name]["seconds"] for part in parts)
        images = sum(part[name]["images"] for part in parts)
        merged[name] = {
            "scores": np.concatenate([by_batch[b] for b in range(len(batches))]),
            "images_per_s": images / seconds if seconds > 0 else float("inf"),
            "peak_mib": max(part[name]["peak_mib"] for part in parts),
            "processes": state.num_processes,
        }
    return merged


# The run ------------------------------------------------------------------------------------


def _warm_up(fns: list, batches, inputs: BenchmarkInputs, config: EvalConfig) -> None:
    """One small untimed call per reward fn, so one-off set-up does not count as throughput."""
    first = batches[0][:1]
    for fn in fns:
        with torch.no_grad():
            fn(inputs.items(first, fn.inputs)[:1], inputs.prompts(first)[:1], seed=config.seed)


def _score_phase(fns: list, batches, inputs: BenchmarkInputs, config: EvalConfig, state: PartialState) -> dict:
    if not fns:
        return {}
    _warm_up(fns, batches, inputs, config)
    return gather_scores(score_locally(fns, batches, inputs, config, state), batches, state)


EVAL_OUTPUTS = ["report.md", "summary.json", "samples.csv", "pairs.csv", "*.png", "missing_images.txt"]


def evaluate(config: EvalConfig, reward_fns: list | None = None, pipe=None, overwrite: bool = False) -> dict | None:
    """Run the evaluation; the main process writes the report and returns the summary (others: None).

    ``reward_fns``: extra :class:`~dina_lrm.rewards.Reward` objects for the table (besides ``config.extra_rewards``);
    ``pipe``: an already loaded generator pipeline for ``config.reward``; ``overwrite``: replace an
    earlier report in ``config.out`` (refused otherwise)."""
    from dina_lrm.eval.report import write_outputs
    from dina_lrm.pipelines import DTYPES, load_pipeline
    from dina_lrm.scorer import Scorer

    config.validate()
    if not config.reward and not config.extra_rewards and not reward_fns:
        raise ValueError("nothing to evaluate: pass --reward (DiNa-LRM) and/or --extra-reward")
    state = PartialState(cpu=cpu_only())
    device = torch.device(config.device) if config.device else state.device
    out = Path(config.out)
    if state.is_main_process:  # before any model loads
        settings = {k: v for k, v in asdict(config).items() if k != "out"}
        claim_output(out, "eval", settings, EVAL_OUTPUTS, overwrite=overwrite)
    state.wait_for_everyone()
    others = [check_reward(fn, f"reward_fns[{i}]") for i, fn in enumerate(reward_fns or [])]
    others += [load_extra_reward(spec) for spec in config.extra_rewards]
    groups, census = read_benchmark(config, out, state)
    scorer = None
    if config.reward:
        pipe = pipe if pipe is not None else load_pipeline(config.model, DTYPES[config.dtype])
        scorer = Scorer.from_pipeline(config.reward, pipe.to(device), config.max_sequence_length)
    latents = None
    if scorer is not None or any(fn.inputs == "latents" for fn in others):
        if pipe is None:
            pipe = load_pipeline(config.model, DTYPES[config.dtype]).to(device)
        latents = _cached_latents(groups, config, out, pipe)
        groups = _with_cached(groups, latents, config)
    batches = make_batches(groups, config.batch_size)
    inputs = BenchmarkInputs(groups, latents)
    pairs = PairIndex.of(groups)
    per_u = [DiNaReward(scorer, Setting((u,))) for u in config.u_values] if scorer else []
    results = _score_phase(per_u + others, batches, inputs, config, state)
    best = None
    if scorer:
        best = max(per_u, key=lambda fn: (pairs.wins(results[fn.name]["scores"]).mean(), -fn.setting.levels[0]))
        u = best.setting.levels[0]
        ensembles = [DiNaReward(scorer, Setting((u,), d)) for d in config.draws]
        ensembles += [DiNaReward(scorer, Setting(tuple(levels))) for levels in config.level_sets]
        results.update(_score_phase(ensembles, batches, inputs, config, state))
        dina = per_u + ensembles
    if not state.is_main_process:
        return None
    settings = {}
    for fn in (dina if scorer else []) + others:
        entry = {"model": "DiNa-LRM" if isinstance(fn, DiNaReward) else fn.name, "inputs": fn.inputs,
                 **accuracy_summary(pairs.wins(results[fn.name]["scores"]), pairs.group_ids, config.bootstrap_resamples, config.seed),
                 **{k: v for k, v in results[fn.name].items() if k != "scores"}}
        if isinstance(fn, DiNaReward):
            entry.update(levels=list(fn.setting.levels), draws=fn.setting.draws,
                         gflops_per_image=_mean_flops(fn, groups, latents) / 1e9)
        if config.protocol != "ours" and config.format in OFFICIAL_METRICS:
            official = official_accuracy(config.format, groups, results[fn.name]["scores"], _pair_probability(fn), config.tie_threshold)
            entry["official"] = {"metric": OFFICIAL_METRICS[config.format], "accuracy": official}
        settings[fn.name] = entry
    summary = {
        "benchmark": {"format": config.format, "input": config.input, **asdict(census)},
        "settings": settings,
        "best_u": best.setting.levels[0] if best else None,
        "calibration": _calibration(best, results, pairs, config) if best else None,
        "config": asdict(config),
    }
    write_outputs(out, summary, groups, pairs, {name: r["scores"] for name, r in results.items()})
    return summary


def _pair_probability(fn: Reward):
    """P(a preferred over b) from two scores: a single-level DiNa-LRM's own loss link; otherwise the
    logistic link of the score difference (PickScore's softmax over two images)."""
    if isinstance(fn, DiNaReward) and len(fn.setting.levels) == 1:
        return lambda a, b: float(fn.preference_probability(torch.tensor([a]), torch.tensor([b]))[0])
    return lambda a, b: 1.0 / (1.0 + math.exp(b - a))


def _cached_latents(groups, config: EvalConfig, out: Path, pipe) -> dict:
    encode = PrepareConfig(format=config.format, input=config.input, out="", model=config.model or "", images_root=config.images_root,
                           reference_size=config.reference_size, batch_size=config.batch_size,
                           groups_per_shard=config.groups_per_shard, dtype=config.dtype)
    directory = Path(config.latent_cache) if config.latent_cache else out / "latents"
    build_latent_cache(groups, directory, encode, pipe_loader=lambda: pipe)
    return load_latent_cache(directory)


def _with_cached(groups, latents: dict, config: EvalConfig) -> list[PreferenceGroup]:
    """Groups whose images could not be decoded during encoding are an error, unless skipped."""
    failed = [g for g in groups if any((g.group_id, i) not in latents for i in range(len(g.images)))]
    if failed and not config.skip_missing:
        raise ValueError(f"{len(failed)} prompt groups have images that could not be decoded (e.g. group {failed[0].group_id}: "
                         f"{failed[0].image_ids}); pass --skip-missing to evaluate without them")
    failed_ids = {g.group_id for g in failed}
    return [g for g in groups if g.group_id not in failed_ids]


def _mean_flops(fn: DiNaReward, groups, latents: dict) -> float:
    shapes = [tuple(latents[(g.group_id, i)][1]) for g in groups for i in range(len(g.images))]
    text_tokens = fn.scorer.prompt_encoder([groups[0].prompt])[0].shape[1]
    per_shape = {shape: scoring_flops(fn.scorer.model, shape, text_tokens, fn.setting) for shape in set(shapes)}
    return float(np.mean([per_shape[s] for s in shapes]))


def _calibration(best: DiNaReward, results: dict, pairs: PairIndex, config: EvalConfig) -> dict:
    scores = torch.as_tensor(results[best.name]["scores"])
    p = best.preference_probability(scores[pairs.preferred], scores[pairs.other])
    return {"setting": best.name, **calibration(p.numpy(), config.calibration_bins)}
