"""``dina-lrm toyworld ablations`` (``make ablations``): the paper's reward-model table in the toy world.

Every row is the full DiNa-LRM with one setting changed (``Variant``), trained on the same pairs for
the same number of steps (the pixel reward: the same training FLOPs), for several seeds. Each trained
model scores the held-out pairs at every noise level of the grid (and the ensembles), and the toy
benchmark at its best level; the per-pair credits (1 right, 0.5 tie, 0 wrong) are saved, and every
number of the table is computed from them: accuracy is the mean credit over pairs and seeds, its
interval a bootstrap over held-out prompts.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dina_lrm import (
    DiNaConfig,
    DiNaLRM,
    NoiseSampler,
    PairRecord,
    PairTable,
    Scorer,
    SD3PromptEncoder,
    SigmaTable,
    bootstrap_interval,
    count_flops,
    load_pipeline,
    load_preference_shards,
    pair_wins,
    write_preference_shards,
)
from dina_lrm_toyworld.ablations_report import write_ablation_report
from dina_lrm_toyworld.alignment import in_workers
from dina_lrm_toyworld.benchmark import write_toy_benchmark
from dina_lrm_toyworld.config import ENSEMBLE, ROW_BY_NAME, AblationConfig, Row, Variant
from dina_lrm_toyworld.demo import DEMO_MODEL, build_preference_data, dina_step_fn, load_generator
from dina_lrm_toyworld.generator import T5_TOKENS, decode_latents, encode_latents, images_to_tensor
from dina_lrm_toyworld.lrm_baseline import PooledCosineLRM, lrm_preference_step
from dina_lrm_toyworld.pairs import FitConfig, PairBatches, fit_pairs, step_flops
from dina_lrm_toyworld.pixel_reward import PixelReward, decode_for_reward, pixel_preference_step
from dina_lrm_toyworld.rewards import CLAUSES, JUDGE, clause_rates

GAP_BINS = {"gap < 0.1": (-1.0, 0.1), "0.1-0.2": (0.1, 0.2), "gap >= 0.2": (0.2, 2.0)}  # one clause of a relation prompt is ~0.095


def dina_config(variant: Variant) -> DiNaConfig:
    """The full model's config with ``variant``'s training settings."""
    model = {**DEMO_MODEL, "model_type": variant.loss, "use_lora": variant.backbone == "lora",
             "freeze_backbone": variant.backbone == "frozen"}
    training = {"t_weighting_scheme": "constant", "t_weighting_scheme_param": 0.0} if variant.train_u == "zero" else {}
    return DiNaConfig.from_dict({"model": model, "training": training, "data": {"train": {"max_sequence_length": T5_TOKENS}}})


def build_model(variant: Variant, transformer, text_widths: tuple[int, int]):
    if variant.reward == "pixel":
        return PixelReward(*text_widths)
    model_class = PooledCosineLRM if variant.reward == "lrm" else DiNaLRM
    return model_class(dina_config(variant), copy.deepcopy(transformer))


def step_function(variant: Variant, model, pipe, sigma_table: SigmaTable):
    if variant.reward == "pixel":
        return lambda batch, generator: pixel_preference_step(model, pipe.vae, batch, generator)
    if variant.reward == "dina":
        return dina_step_fn(model, sigma_table)
    training = model.config.training
    sampler = NoiseSampler.from_release(training.t_weighting_scheme, training.t_weighting_scheme_param)
    return lambda batch, generator: lrm_preference_step(model, batch, sigma_table, sampler, generator=generator)


class PairScorer:
    """Scores (prompts, latents) with one trained model at a noise level (or an ensemble of levels).
    Chosen and rejected of a pair get the same noise draw (seeded by the pair), as in training."""

    def __init__(self, variant: Variant, model, pipe, prompt_encoder, sigma_table: SigmaTable):
        self.variant, self.model, self.pipe, self.prompt_encoder = variant, model.eval(), pipe, prompt_encoder
        self.scorer = None if variant.reward == "pixel" else Scorer(model, prompt_encoder, sigma_table)

    @torch.no_grad()
    def __call__(self, prompts: list[str], latents: torch.Tensor, levels: tuple[float, ...], batch: int = 256) -> torch.Tensor:
        if self.scorer is None:
            return torch.cat([self.model(decode_for_reward(self.pipe.vae, latents[i : i + batch]), *self.prompt_encoder(prompts[i : i + batch]))
                              for i in range(0, len(latents), batch)])
        return self.scorer.score(prompts, latents=latents, noise_levels=list(levels), seeds=list(range(len(latents)))).raw

    def credits(self, pairs: PairTable, levels: tuple[float, ...]) -> np.ndarray:
        return pair_wins(self(pairs.prompts, pairs.chosen, levels), self(pairs.prompts, pairs.rejected, levels)).numpy()


def settings(variant: Variant, u_grid: tuple[float, ...]) -> dict[str, tuple[float, ...]]:
    """The scoring settings a trained model is evaluated at: each u, and the ensemble."""
    if variant.reward == "pixel":
        return {"pixels": ()}
    return {**{f"{u:.1f}": (u,) for u in u_grid}, "ensemble": ENSEMBLE}


def image_flops(variant: Variant, model, pipe, prompt_encoder, sigma_table: SigmaTable, latents: torch.Tensor, prompts: list[str]) -> float:
    """FLOPs to score one image in this row's setting (the pixel reward's VAE decode included)."""
    scorer = PairScorer(variant, model, pipe, prompt_encoder, sigma_table)
    levels = variant.test_levels or (0.5,)
    return count_flops(lambda: scorer(prompts, latents, levels)) / len(latents)


def train_and_score(variant_fields: dict, seed: int, steps: int, data_dir: str, generator_dir: str, config: dict) -> dict:
    """One (training variant, seed): train, then the per-pair credits at every setting on the held-out
    pairs and the benchmark. Runs in a worker process; everything it needs comes from disk."""
    variant = Variant(**variant_fields)
    pipe = load_pipeline(generator_dir)
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    sigma_table = SigmaTable.from_scheduler(pipe.scheduler)
    data = Path(data_dir)
    train_pairs, test_pairs = load_preference_shards(data / "train"), load_preference_shards(data / "test")
    benchmark = load_preference_shards(data / "benchmark")
    batches = PairBatches(train_pairs, prompt_encoder, config["batch_size"], seed)
    torch.manual_seed(seed)
    model = build_model(variant, pipe.transformer, (batches.states.shape[-1], batches.pooled.shape[-1]))
    model.train()
    fit = FitConfig(batch_size=config["batch_size"], learning_rate=config["learning_rate"], max_steps=steps, seed=seed)
    history = fit_pairs(step_function(variant, model, pipe, sigma_table), model.parameters(), batches, fit,
                        desc=f"{variant.reward}/{variant.loss}/{variant.train_u}/{variant.backbone} seed {seed}")
    scorer = PairScorer(variant, model, pipe, prompt_encoder, sigma_table)
    heldout = {name: scorer.credits(test_pairs, levels).tolist() for name, levels in settings(variant, tuple(config["u_grid"])).items()}
    bench = {name: scorer.credits(benchmark, levels).tolist() for name, levels in settings(variant, tuple(config["u_grid"])).items()}
    return {"variant": variant_fields, "seed": seed, "steps": steps, "train_seconds": history[-1]["seconds"],
            "heldout": heldout, "benchmark": bench,
            "final_train_accuracy": next((h["train_accuracy"] for h in reversed(history) if "train_accuracy" in h), None)}


def write_benchmark_pairs(vae, directory: Path, prompts: int, seed: int) -> Path:
    """The judge-ranked toy benchmark (PNG files, HPDv2 layout) as VAE-encoded preference pairs: per
    prompt every two images of different rank, the better one chosen."""
    index = write_toy_benchmark(directory / "benchmark_images", prompts=prompts, seed=seed)
    records = []
    for number, row in enumerate(json.loads(index.read_text())):
        images = images_to_tensor([np.asarray(Image.open(index.parent / path).convert("RGB")) for path in row["image_path"]])
        latents = encode_latents(vae, images).numpy()
        for a, b in itertools.combinations(range(len(latents)), 2):
            if row["rank"][a] != row["rank"][b]:
                better, worse = (a, b) if row["rank"][a] < row["rank"][b] else (b, a)
                records.append(PairRecord(prompt=row["prompt"], chosen=latents[better], rejected=latents[worse],
                                          pair_id=f"benchmark-{len(records):06d}", group_id=f"{number:04d} {row['prompt']}", source="benchmark"))
    return write_preference_shards(directory / "benchmark", records, metadata={"split": "benchmark", "world": "toy"})


def judged_differences(vae, pairs: PairTable) -> tuple[list[list[str]], list[float]]:
    """Per pair, the clause kinds (``rewards.CLAUSES`` but quality) on which the judge tells chosen and
    rejected apart (empty where they differ in image quality only), and the judge-score gap."""
    results = [JUDGE.batch(list(decode_latents(vae, side)), pairs.prompts) for side in (pairs.chosen, pairs.rejected)]
    kinds, gaps = [], []
    for prompt, chosen, rejected in zip(pairs.prompts, *results):
        a, b = clause_rates(chosen, prompt), clause_rates(rejected, prompt)
        kinds.append([k for k in CLAUSES[:-1] if not (np.isnan(a[k]) and np.isnan(b[k])) and a[k] != b[k]])
        gaps.append(chosen.score - rejected.score)
    return kinds, gaps


def prepare_data(out: Path, pipe, prompt_encoder, config: AblationConfig) -> dict:
    """Train/test shards of the generator's samples and corruptions, the benchmark shard, and per test
    pair its prompt, source and differing clauses."""
    data_dir = out / "data"
    stats = build_preference_data(pipe, prompt_encoder, config.data, data_dir)
    write_benchmark_pairs(pipe.vae, data_dir, config.benchmark_prompts, config.data.seed)
    test, benchmark = load_preference_shards(data_dir / "test"), load_preference_shards(data_dir / "benchmark")
    return {
        "train_pairs": stats["train"]["pairs"], "label_flip_rate": stats["train"]["label_flip_rate"],
        "generator_judge_score": stats["test"]["generator_judge_score"],
        "heldout": dict(zip(("groups", "sources", "clauses", "gaps"), (test.group_ids, test.sources, *judged_differences(pipe.vae, test)))),
        "benchmark": {"groups": benchmark.group_ids},
    }


def training_key(variant: Variant) -> str:
    v = variant.training
    return f"{v.reward}-{v.loss}-{v.train_u}-{v.backbone}"


def costs(variants: list[Variant], pipe, prompt_encoder, data_dir: Path, config: AblationConfig) -> dict:
    """Counted, not timed: training FLOPs per step of each trained model and FLOPs to score one image
    in each row's setting."""
    sigma_table = SigmaTable.from_scheduler(pipe.scheduler)
    pairs = load_preference_shards(data_dir / "test")
    batch = next(iter(PairBatches(pairs, prompt_encoder, config.batch_size, 0)))
    latents, prompts = pairs.chosen[:8], pairs.prompts[:8]
    widths = (batch.encoder_hidden_states.shape[-1], batch.pooled_projections.shape[-1])
    train, image = {}, {}
    for variant in variants:
        torch.manual_seed(0)
        model = build_model(variant, pipe.transformer, widths).train()
        train.setdefault(training_key(variant), step_flops(step_function(variant, model, pipe, sigma_table), model, batch))
        image[variant] = image_flops(variant, model.requires_grad_(False), pipe, prompt_encoder, sigma_table, latents, prompts)
    return {"train_flops_per_step": train, "image_flops": image}


def steps_for(variant: Variant, config: AblationConfig, train_flops: dict) -> int:
    """``config.steps`` for the rows on DiNa-LRM's backbone; the pixel reward gets as many steps as the
    full model's training FLOPs buy it."""
    if variant.reward != "pixel":
        return config.steps
    return max(1, round(config.steps * train_flops[training_key(Variant())] / train_flops[training_key(variant)]))


def run_ablations(out: str | Path, config: AblationConfig | None = None, generator_dir: str | Path | None = None,
                  overwrite: bool = False) -> dict:
    """Everything in the module docstring; writes ``ablations.md``, ``ablations.json``, ``credits.npz`` and
    plots under ``out``. Refuses an ``out`` that holds earlier ablations unless ``overwrite``."""
    config = config or AblationConfig()
    config.validate()
    out = Path(out)
    if (out / "ablations.json").exists() or (out / "data").exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds earlier ablations; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe, generator_dir = load_generator(out, generator_dir, False, config.data.seed)
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    pairs = prepare_data(out, pipe, prompt_encoder, config)
    rows = [ROW_BY_NAME[name] for name in config.rows]
    needed = [Variant()] + [row.variant for row in rows]
    cost = costs(list(dict.fromkeys(needed)), pipe, prompt_encoder, out / "data", config)
    trainings = list(dict.fromkeys(row.variant.training for row in rows))
    scoring = {"batch_size": config.batch_size, "learning_rate": config.learning_rate, "u_grid": list(config.u_grid)}
    calls = [(asdict(v), seed, steps_for(v, config, cost["train_flops_per_step"]), str(out / "data"), str(generator_dir), scoring)
             for v in trainings for seed in config.seeds]
    data_seconds = time.perf_counter() - started
    results = in_workers(train_and_score, calls, config.workers)
    credits = {f"{training_key(Variant(**r['variant']))}/seed{r['seed']}/{split}/{setting}": np.asarray(values)
               for r in results for split in ("heldout", "benchmark") for setting, values in r[split].items()}
    np.savez_compressed(out / "credits.npz", **credits)
    summary = {
        "config": asdict(config), "generator": str(generator_dir), "data": pairs,
        "rows": [{"name": row.name, "variant": asdict(row.variant), "reference": row.reference,
                  "training": training_key(row.variant), "gflops_per_image": cost["image_flops"][row.variant] / 1e9} for row in rows],
        "trainings": {training_key(Variant(**r["variant"])): {"steps": r["steps"],
                      "train_gflops_per_step": cost["train_flops_per_step"][training_key(Variant(**r["variant"]))] / 1e9}
                      for r in results},
        "train_seconds": {f"{training_key(Variant(**r['variant']))}/seed{r['seed']}": r["train_seconds"] for r in results},
        "final_train_accuracy": {f"{training_key(Variant(**r['variant']))}/seed{r['seed']}": r["final_train_accuracy"] for r in results},
        "timings_s": {"data_and_costs": round(data_seconds, 1), "total": None},
    }
    summary["table"] = ablation_table(summary, credits)
    summary["claims"] = paper_claims(summary, credits, summary["table"])
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    write_ablation_report(out, summary)
    (out / "ablations.json").write_text(json.dumps(summary, indent=1))
    return summary


CLAIMS = (  # (the paper's direction, left row, right row, comparison, where): left > right or left >= right
    ("noise-calibrated variance beats constant variance", "DiNa-LRM (full)", "constant variance", ">", "best"),
    ("clean-only training collapses at u >= 0.4", "DiNa-LRM (full)", "clean only (u = 0)", ">", "u>=0.4"),
    ("LoRA beats a frozen backbone", "DiNa-LRM (full)", "frozen backbone (head only)", ">", "best"),
    ("the ensemble matches or beats the best single u, with calibration", "ensemble {0.2,0.5,0.7}, calibrated",
     "DiNa-LRM (full)", ">=", "best"),
    ("without calibration the ensemble does not beat the best single u", "constant variance",
     "ensemble {0.2,0.5,0.7}, constant variance", ">=", "best"),
    ("DiNa-LRM beats the LRM-style baseline", "DiNa-LRM (full)", "LRM-style (LPO: pooled cosine, BT)", ">", "best"),
    ("DiNa-LRM matches or beats the pixel reward at equal compute", "DiNa-LRM (full)", "pixel reward (decodes), equal FLOPs", ">=", "best"),
)


def row_settings(row: Row, u_grid) -> list[str]:
    if row.variant.reward == "pixel":
        return ["pixels"]
    return ["ensemble"] if row.variant.test_levels else [f"{u:.1f}" for u in u_grid]


def seed_mean(credits: dict, key: str, seeds: list[int], split: str, setting: str) -> np.ndarray:
    """Per pair, the credit averaged over seeds."""
    return np.mean([credits[f"{key}/seed{seed}/{split}/{setting}"] for seed in seeds], axis=0)


def subset_accuracy(credit: np.ndarray, mask: np.ndarray) -> dict:
    return {"accuracy": float(credit[mask].mean()) if mask.any() else None, "pairs": int(mask.sum())}


def interval(values: np.ndarray, groups: list, resamples: int) -> dict:
    return {"accuracy": float(np.mean(values)), "ci": list(bootstrap_interval(values, groups, resamples=resamples)), "pairs": len(values)}


def row_credits(summary: dict, credits: dict, name: str) -> tuple[dict[str, np.ndarray], str]:
    """Per held-out pair, the seed-mean credit of one row at each of its settings, plus ``best`` (the
    setting with the highest mean) and ``high_noise`` (the mean over the settings with u >= 0.4); and
    the name of the best setting."""
    config = summary["config"]
    row, key = ROW_BY_NAME[name], next(r["training"] for r in summary["rows"] if r["name"] == name)
    per_setting = {s: seed_mean(credits, key, config["seeds"], "heldout", s) for s in row_settings(row, config["u_grid"])}
    best = max(per_setting, key=lambda s: per_setting[s].mean())
    high = [v for s, v in per_setting.items() if s[0].isdigit() and float(s) >= 0.4]
    return {**per_setting, "best": per_setting[best], "high_noise": np.mean(high, axis=0) if high else per_setting[best]}, best


def ablation_table(summary: dict, credits: dict) -> dict:
    """Every number of the table, from the per-pair credits alone (and the pairs' prompts, sources and
    clauses): per row, accuracy per u, the best setting (chosen on the held-out pairs, the same way for
    every row), held-out / generated-pair / benchmark accuracy there with intervals, per clause and by gap."""
    config, data = summary["config"], summary["data"]
    seeds, resamples = config["seeds"], config["resamples"]
    heldout_groups, sources, clauses = data["heldout"]["groups"], data["heldout"]["sources"], data["heldout"]["clauses"]
    generated = np.array([s == "generated" for s in sources])
    by_clause = {kind: np.array([kind in differing for differing in clauses]) for kind in CLAUSES[:-1]}
    by_clause["quality only"] = np.array([not differing for differing in clauses])
    gaps = np.asarray(data["heldout"]["gaps"])
    table = {}
    for entry in summary["rows"]:
        key = entry["training"]
        per_setting, best = row_credits(summary, credits, entry["name"])
        credit = per_setting["best"]
        settings_only = {s: v for s, v in per_setting.items() if s not in ("best", "high_noise")}
        table[entry["name"]] = {
            "per_u": {s: float(v.mean()) for s, v in settings_only.items()} if len(settings_only) > 1 else {},
            "best": best,
            "heldout": interval(credit, heldout_groups, resamples),
            "generated": interval(credit[generated], [g for g, keep in zip(heldout_groups, generated) if keep], resamples),
            "benchmark": interval(seed_mean(credits, key, seeds, "benchmark", best), data["benchmark"]["groups"], resamples),
            "per_seed": [float(np.mean(credits[f"{key}/seed{seed}/heldout/{best}"])) for seed in seeds],
            "clauses": {kind: subset_accuracy(credit, mask) for kind, mask in by_clause.items()},
            "by_gap": {name: subset_accuracy(credit, (gaps >= low) & (gaps < high)) for name, (low, high) in GAP_BINS.items()},
            "high_noise": interval(per_setting["high_noise"], heldout_groups, resamples),
            "gflops_per_image": entry["gflops_per_image"],
            "steps": summary["trainings"][key]["steps"],
            "train_seconds": float(np.mean([summary["train_seconds"][f"{key}/seed{seed}"] for seed in seeds])),
        }
    return table


def paper_claims(summary: dict, credits: dict, table: dict) -> list[dict]:
    """Each direction of the paper's ablations, for the rows present: both sides with their intervals and
    whether it reproduces (>: the two intervals do not overlap; >=: the left accuracy is at least the
    right), and beside it the paired difference on the same pairs with its bootstrap interval over prompts."""
    groups, resamples = summary["data"]["heldout"]["groups"], summary["config"]["resamples"]
    claims = []
    for text, left, right, comparison, where in CLAIMS:
        if left not in table or right not in table:
            continue
        credit_key, table_key = ("high_noise", "high_noise") if where == "u>=0.4" else ("best", "heldout")
        a, b = table[left][table_key], table[right][table_key]
        holds = a["ci"][0] > b["ci"][1] if comparison == ">" else a["accuracy"] >= b["accuracy"]
        difference = row_credits(summary, credits, left)[0][credit_key] - row_credits(summary, credits, right)[0][credit_key]
        claims.append({"claim": text, "left": left, "right": right, "comparison": comparison, "where": where,
                       "left_accuracy": a["accuracy"], "left_ci": a["ci"], "right_accuracy": b["accuracy"], "right_ci": b["ci"],
                       "difference": float(difference.mean()), "difference_ci": list(bootstrap_interval(difference, groups, resamples=resamples)),
                       "reproduced": bool(holds)})
    return claims
