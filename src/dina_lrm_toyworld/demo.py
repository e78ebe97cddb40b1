"""``make demo``: the whole DiNa-LRM story in the toy world, on a CPU, against ground truth.

1. load the shipped toy generator (or pretrain one with ``from_scratch``);
2. sample and judge, write preference shards (train pairs from a noisy rater, held-out test pairs
   on unseen colour-shape combinations labelled by the noise-free judge);
3. train DiNa-LRM (LoRA on the first blocks + head, noise-calibrated Thurstone) and three baselines
   on the same pairs: Bradley-Terry loss and constant-variance Thurstone loss for the same number of
   steps, and a pixel-space reward that must VAE-decode, for the same training FLOPs. Budgets are
   counted, never timed, so a busy machine gives the same models; the seconds are reported beside;
4. evaluate held-out pairwise accuracy per noise level u and for a multi-level ensemble, with the
   DiNa-LRM checkpoint saved in the release layout and reloaded through ``Scorer.from_pretrained``;
5. write ``report.md`` with the table and plots.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dina_lrm import (
    DiNaConfig,
    DiNaLRM,
    EvalConfig,
    NoiseSampler,
    PairTable,
    Scorer,
    SD3PromptEncoder,
    SigmaTable,
    bootstrap_interval,
    claim_output,
    evaluate,
    load_pipeline,
    load_preference_shards,
    pair_wins,
    preference_step,
    write_preference_shards,
)
from dina_lrm_toyworld.benchmark import write_toy_benchmark
from dina_lrm_toyworld.config import U_GRID, DemoConfig, PreferenceDataConfig, PretrainConfig
from dina_lrm_toyworld.generator import T5_TOKENS
from dina_lrm_toyworld.judge import Judge
from dina_lrm_toyworld.pairs import FitConfig, PairBatches, fit_pairs, step_flops
from dina_lrm_toyworld.pixel_reward import PixelReward, decode_for_reward, pixel_preference_step
from dina_lrm_toyworld.preferences import candidate_pairs, corruption_candidates, generated_candidates, label_pairs
from dina_lrm_toyworld.pretrain import pretrain, reconstruction_psnr
from dina_lrm_toyworld.report import write_report
from dina_lrm_toyworld.rewards import save_pixel_reward
from dina_lrm_toyworld.scenes import render, sample_prompts, scene_for
from dina_lrm_toyworld.search_experiment import run_search_experiment

SHIPPED_GENERATOR = Path(__file__).parent / "pretrained"
SHIPPED_REWARD = Path(__file__).parent / "pretrained_reward"  # the demo's DiNa-LRM (Thurstone), copied from demo_out/reward_model
DINA_LOSSES = {"DiNa-LRM (Thurstone)": "thurstone", "Bradley-Terry": "bt", "constant-variance Thurstone": "thurstone_const"}
PIXEL_METHOD = "pixel reward (decodes)"
DEMO_MODEL = {
    "num_transformer_layers": 3,
    "visual_head_idx": [1, 2, 3],
    "text_head_idx": [1, 2, 3],
    "lora_config": {"r": 8, "lora_alpha": 16},
    "reward_head": {"num_attn_heads": 4},
}


@contextmanager
def timed(timings: dict, name: str):
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)


def build_preference_data(pipe, prompt_encoder, config: PreferenceDataConfig, out: Path) -> dict:
    """Write train/test shards under ``out``; returns statistics and the held-out samples."""
    judge, stats = Judge(), {}
    for split, seed_offset in (("train", 0), ("test", 1)):
        specs = sample_prompts(config.train_prompts if split == "train" else config.test_prompts, split, config.seed + seed_offset)
        generated = generated_candidates(pipe, prompt_encoder, judge, specs, config, seed=config.seed + seed_offset)
        corrupted = corruption_candidates(pipe.vae, judge, specs, config, seed=config.seed + seed_offset)
        pairs = candidate_pairs(generated + corrupted, config.min_judge_gap)
        flip_rate = config.flip_rate if split == "train" else 0.0
        records, flipped = label_pairs(pairs, flip_rate, np.random.default_rng(config.seed + seed_offset), split)
        write_preference_shards(out / split, records, metadata={"split": split, "flip_rate": flip_rate, "world": "toy"})
        stats[split] = {
            "prompts": len(specs),
            "pairs": len(records),
            "pairs_from_generations": sum(r.source == "generated" for r in records),
            "label_flip_rate": round(flipped, 3),
            "generator_judge_score": float(np.mean([c.score for c in generated])),
            "generator_clause_rate": float(np.mean([c.alignment for c in generated])),
            "generator_quality": float(np.mean([c.quality for c in generated])),
            "renders_judge_score": float(np.mean([c.score for c in corrupted if c.source == "render"])),
        }
        if split == "test":
            stats["samples"] = generated
            stats["world"] = world_checks(pipe.vae, specs, config.seed)
    return stats


def world_checks(vae, specs, seed: int) -> dict:
    """The judge on clean renders (fraction of clauses it gets right) and the VAE's PSNR on them."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(scene_for(spec, rng)) for spec in specs])
    judged = Judge().batch(images, specs)
    return {
        "judge_clause_accuracy_on_renders": sum(sum(r.clauses.values()) for r in judged) / sum(len(r.clauses) for r in judged),
        "vae_psnr_db": reconstruction_psnr(vae, images),
    }


def dina_config(loss: str) -> DiNaConfig:
    return DiNaConfig.from_dict({"model": {**DEMO_MODEL, "model_type": loss}, "data": {"train": {"max_sequence_length": T5_TOKENS}}})


def dina_wins(scorer: Scorer, pairs: PairTable, seed: int, **levels) -> torch.Tensor:
    """Per pair: 1 when chosen scores above rejected; the two share one noise draw, seeded by the pair."""
    seeds = [seed + i for i in range(len(pairs))]
    chosen = scorer.score(pairs.prompts, latents=pairs.chosen, seeds=seeds, **levels).raw
    return pair_wins(chosen, scorer.score(pairs.prompts, latents=pairs.rejected, seeds=seeds, **levels).raw)


def dina_accuracy(scorer: Scorer, pairs: PairTable, seed: int, **levels) -> float:
    return dina_wins(scorer, pairs, seed, **levels).mean().item()


@torch.no_grad()
def pixel_scores(model: PixelReward, vae, prompt_encoder, prompts: list[str], latents: torch.Tensor, batch: int = 128):
    scores = []
    for start in range(0, len(latents), batch):
        states, pooled = prompt_encoder(prompts[start : start + batch])
        scores.append(model(decode_for_reward(vae, latents[start : start + batch]), states, pooled))
    return torch.cat(scores)


def pixel_wins(model: PixelReward, vae, prompt_encoder, pairs: PairTable) -> torch.Tensor:
    chosen = pixel_scores(model, vae, prompt_encoder, pairs.prompts, pairs.chosen)
    return pair_wins(chosen, pixel_scores(model, vae, prompt_encoder, pairs.prompts, pairs.rejected))


def pixel_accuracy(model: PixelReward, vae, prompt_encoder, pairs: PairTable) -> float:
    return pixel_wins(model, vae, prompt_encoder, pairs).mean().item()


def subset(pairs: PairTable, index) -> PairTable:
    index = list(index)
    return PairTable(
        [pairs.prompts[i] for i in index], pairs.chosen[index], pairs.rejected[index], pairs.confidence[index],
        [pairs.sources[i] for i in index], [pairs.group_ids[i] for i in index],
    )


def fit_config(config: DemoConfig, steps: int | None = None) -> FitConfig:
    return FitConfig(batch_size=config.batch_size, learning_rate=config.learning_rate, max_steps=steps or config.steps,
                     eval_every=config.eval_every, seed=config.seed)


def dina_step_fn(model: DiNaLRM, sigma_table: SigmaTable):
    training = model.config.training
    sampler = NoiseSampler.from_release(training.t_weighting_scheme, training.t_weighting_scheme_param)
    return lambda batch, generator: preference_step(model, batch, sigma_table, sampler, generator=generator)


def pixel_steps(pipe, prompt_encoder, pairs: PairTable, config: DemoConfig) -> int:
    """The pixel reward's steps at DiNa-LRM's training FLOPs (``config.steps`` steps of the full model)."""
    torch.manual_seed(config.seed)
    batch = next(iter(PairBatches(pairs, prompt_encoder, config.batch_size, config.seed)))
    dina = DiNaLRM(dina_config("thurstone"), copy.deepcopy(pipe.transformer)).train()
    dina_flops = step_flops(dina_step_fn(dina, SigmaTable.from_scheduler(pipe.scheduler)), dina, batch)
    pixel = PixelReward(batch.encoder_hidden_states.shape[-1], batch.pooled_projections.shape[-1])
    pixel_flops = step_flops(lambda b, g: pixel_preference_step(pixel, pipe.vae, b, g), pixel, batch)
    return max(1, round(config.steps * dina_flops / pixel_flops))


def train_dina(pipe, prompt_encoder, loss: str, batches: PairBatches, monitor: PairTable, config: DemoConfig, name: str):
    torch.manual_seed(config.seed)  # the head's and the LoRA's initial weights
    model = DiNaLRM(dina_config(loss), copy.deepcopy(pipe.transformer))
    scorer = Scorer(model, prompt_encoder, SigmaTable.from_scheduler(pipe.scheduler))
    step = dina_step_fn(model, scorer.sigma_table)

    def evaluate() -> dict:
        model.eval()
        accuracy = dina_accuracy(scorer, monitor, config.seed, u=config.monitor_u)
        model.train()
        return {"heldout_accuracy": accuracy}

    model.train()
    history = fit_pairs(step, model.parameters(), batches, fit_config(config), evaluate, desc=name)
    return model.eval(), history


def train_pixel(pipe, prompt_encoder, batches: PairBatches, monitor: PairTable, config: DemoConfig, steps: int | None = None):
    torch.manual_seed(config.seed)
    text_width, pooled_width = batches.states.shape[-1], batches.pooled.shape[-1]
    model = PixelReward(text_width, pooled_width)

    def evaluate() -> dict:
        accuracy = pixel_accuracy(model.eval(), pipe.vae, prompt_encoder, monitor)
        model.train()
        return {"heldout_accuracy": accuracy}

    history = fit_pairs(
        lambda batch, generator: pixel_preference_step(model, pipe.vae, batch, generator),
        model.parameters(), batches, fit_config(config, steps), evaluate, desc=PIXEL_METHOD,
    )
    return model.eval(), history


def load_generator(out: Path, generator_dir: Path | None, from_scratch: bool, seed: int):
    if from_scratch:
        generator_dir = out / "generator"
        pretrain(generator_dir, PretrainConfig(seed=seed))
    generator_dir = Path(generator_dir or SHIPPED_GENERATOR)
    return load_pipeline(generator_dir), generator_dir


def parameter_count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


DEMO_OUTPUTS = ["generator", "shards", "reward_model", "pixel_reward.safetensors", "benchmark", "eval", "report.md",
                "summary.json", "*.png"]


def run_demo(
    out: str | Path, config: DemoConfig | None = None, generator_dir: str | Path | None = None, from_scratch: bool = False,
    overwrite: bool = False,
) -> dict:
    """The demo, into ``out``: a rerun with the same settings redoes it (its results are deterministic);
    an ``out`` that holds a demo with other settings is refused unless ``overwrite``."""
    config = config or DemoConfig()
    out = Path(out)
    settings = {"config": asdict(config), "generator": str(generator_dir or SHIPPED_GENERATOR), "from_scratch": from_scratch}
    claim_output(out, "demo", settings, DEMO_OUTPUTS, overwrite=overwrite, continues=True)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    with timed(timings, "load generator"):
        pipe, generator_dir = load_generator(out, generator_dir, from_scratch, config.seed)
        prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    with timed(timings, "sample, judge, write shards"):
        data = build_preference_data(pipe, prompt_encoder, config.data, out / "shards")
        train_pairs, test_pairs = load_preference_shards(out / "shards" / "train"), load_preference_shards(out / "shards" / "test")
    monitor = subset(test_pairs, range(min(config.monitor_pairs, len(test_pairs))))
    models, histories = {}, {}
    for name, loss in DINA_LOSSES.items():
        with timed(timings, f"train {name}"):
            batches = PairBatches(train_pairs, prompt_encoder, config.batch_size, config.seed)
            models[name], histories[name] = train_dina(pipe, prompt_encoder, loss, batches, monitor, config, name)
    with timed(timings, f"train {PIXEL_METHOD}"):
        steps = pixel_steps(pipe, prompt_encoder, train_pairs, config)
        batches = PairBatches(train_pairs, prompt_encoder, config.batch_size, config.seed)
        pixel_model, histories[PIXEL_METHOD] = train_pixel(pipe, prompt_encoder, batches, monitor, config, steps)
    with timed(timings, "evaluate"):
        reward_dir = models["DiNa-LRM (Thurstone)"].save_pretrained(out / "reward_model")
        save_pixel_reward(pixel_model, out / "pixel_reward.safetensors")
        reloaded = Scorer.from_pretrained(reward_dir, generator_dir)
        results = evaluate_methods(models, reloaded, pixel_model, pipe, prompt_encoder, test_pairs, config)
    with timed(timings, "benchmark eval"):
        benchmark = write_toy_benchmark(out / "benchmark", prompts=config.benchmark_prompts, seed=config.seed)
        eval_config = EvalConfig(format="hpdv2", input=str(benchmark), out=str(out / "eval"), reward=str(reward_dir),
                                 model=str(generator_dir), seed=config.seed)
        benchmark_eval = evaluate(eval_config, pipe=pipe, overwrite=True)  # the demo's own folder, claimed above
    with timed(timings, "reward-guided sampling"):
        fresh = load_pipeline(generator_dir)  # the demo's pipe carries the trained models' LoRA layers; the generator samples without
        search = run_search_experiment(fresh, reward_dir, pixel_model, prompts=config.search_prompts, seed=config.seed + 7, progress=False)
    summary = {
        "config": asdict(config),
        "generator": str(generator_dir),
        "data": {k: v for k, v in data.items() if k != "samples"},
        "accuracy": results,
        "benchmark_eval": {"best_u": benchmark_eval["best_u"], "pairs": benchmark_eval["benchmark"]["pairs"],
                           "settings": {k: {"accuracy": v["accuracy"], "ci": v["ci"]} for k, v in benchmark_eval["settings"].items()}},
        "parameters": {
            "DiNa-LRM total": parameter_count(models["DiNa-LRM (Thurstone)"]),
            "DiNa-LRM trainable": parameter_count(models["DiNa-LRM (Thurstone)"], trainable=True),
            "pixel reward": parameter_count(pixel_model),
        },
        "search": search,
        "histories": histories,
        "timings_s": timings,
    }
    with timed(timings, "report"):
        report = write_report(out, summary, data["samples"], reloaded)
    summary["timings_s"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(report)
    first = json.loads(benchmark.read_text())[0]  # a benchmark prompt: its clean render, then a corrupted one
    images = " ".join(str(benchmark.parent / path) for path in first["image_path"][:2])
    print(f"Wrote {out / 'report.md'}. Score images with the saved reward model (u = 0.1 suits image files):\n"
          f"  dina-lrm score --reward {reward_dir} --model {generator_dir} --u 0.1 --prompt '{first['prompt']}' {images}")
    return summary


def evaluate_methods(models, reloaded: Scorer, pixel_model, pipe, prompt_encoder, test_pairs: PairTable, config: DemoConfig) -> dict:
    """Held-out accuracy: per u and ensemble for each DiNa-LRM loss, once for the pixel reward, and
    by pair source for the main model (at its best u) and the pixel reward."""
    sigma_table = reloaded.sigma_table
    results: dict = {}
    groups = test_pairs.group_ids
    sources = sorted(set(test_pairs.sources))
    progress = tqdm(total=len(models) * (len(U_GRID) + 1) + 1 + 2 * len(sources), desc="evaluate held-out pairs", mininterval=5)

    def summarise(wins: torch.Tensor) -> tuple[float, list[float]]:
        progress.update(1)
        return wins.mean().item(), list(bootstrap_interval(wins.numpy(), groups, seed=config.seed))

    for name, model in models.items():
        scorer = reloaded if name == "DiNa-LRM (Thurstone)" else Scorer(model, prompt_encoder, sigma_table)
        per_u = {f"{u:.1f}": summarise(dina_wins(scorer, test_pairs, config.seed, u=u)) for u in U_GRID}
        ensemble, ensemble_ci = summarise(dina_wins(scorer, test_pairs, config.seed, noise_levels=list(config.ensemble_levels)))
        best_u = max(per_u, key=lambda u: per_u[u][0])
        results[name] = {"per_u": {u: a for u, (a, _) in per_u.items()}, "best_u": best_u, "best_ci": per_u[best_u][1],
                         "ensemble": ensemble, "ensemble_ci": ensemble_ci}
    pixel, pixel_ci = summarise(pixel_wins(pixel_model, pipe.vae, prompt_encoder, test_pairs))
    results[PIXEL_METHOD] = {"accuracy": pixel, "ci": pixel_ci}
    main = results["DiNa-LRM (Thurstone)"]
    by_source = {}
    for source in sources:
        part = subset(test_pairs, [i for i, s in enumerate(test_pairs.sources) if s == source])
        by_source[source] = {
            "pairs": len(part),
            "DiNa-LRM": dina_accuracy(reloaded, part, config.seed, u=float(main["best_u"])),
            "pixel": pixel_accuracy(pixel_model, pipe.vae, prompt_encoder, part),
        }
        progress.update(2)
    progress.close()
    results["by_source"] = by_source
    return results
