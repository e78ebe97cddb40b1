"""Reward-guided sampling in the toy world (issue: search during denoising): the judge score of the
returned image against the sampling cost, for plain sampling, best-of-N with the pixel reward (decodes
every candidate), best-of-N with DiNa-LRM on the clean latents, prune-and-continue with DiNa-LRM, and
best-of-N with the judge itself (the ceiling), N in {1, 2, 4, 8, 16}; and how early one can prune: the
rank correlation between a candidate's DiNa-LRM score on its noisy latent at sigma and its final judge score.

Per held-out prompt, 16 candidates are sampled once (Euler ODE, seeded) with every step's latent
kept; best-of-N takes the first N, and prune-and-continue replays the pruning on those trajectories
(a deterministic ODE: a survivor continues as it would have; checked against the real ``Searcher`` on
the first prompts). Cost per returned image: analytic FLOPs (the generator's guided steps actually
run, the rewards, the decodes), and CPU-seconds composed from unit costs measured in the same run.
Intervals: bootstrap over prompts. ``bench/search_toyworld.py`` and ``make demo`` run it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.stats import spearmanr

from dina_lrm import SearchConfig, Searcher, Setting, count_flops, euler_step, initial_noise, scoring_flops, vae_decode
from dina_lrm_toyworld.generator import T5_TOKENS
from dina_lrm_toyworld.pixel_reward import PixelReward
from dina_lrm_toyworld.rewards import judge_scores
from dina_lrm_toyworld.scenes import sample_prompts

SIZES = (1, 2, 4, 8, 16)
AT = [0.6, 0.3]  # the default checkpoints
PRUNE = [(4, 1, AT), (8, 2, AT), (8, 1, AT), (16, 4, AT), (16, 2, AT), (16, 1, AT),  # (n, keep, checkpoint sigmas)
         (16, 4, [0.8, 0.5]), (16, 8, [0.8]), (16, 4, [0.8]), (8, 2, [0.8])]
CORRELATION_SIGMAS = (0.8, 0.6, 0.4, 0.2)
STEPS, GUIDANCE = 12, 4.0


def trajectories(searcher: Searcher, prompt: str, seed: int) -> torch.Tensor:
    """(steps + 1, 16, C, h, w): the latents before each step and the clean ones."""
    schedule, transformer = searcher.schedule, searcher.pipe.transformer
    x = initial_noise(max(SIZES), searcher.latent_shape, torch.Generator().manual_seed(seed), "cpu")
    text = searcher._conditioning(prompt, len(x))
    kept = [x]
    with torch.no_grad():
        for step in range(schedule.num_steps):
            x = euler_step(schedule, step, x, searcher.policy.velocity(transformer, x, float(schedule.sigmas[step]), text, GUIDANCE))
            kept.append(x)
    return torch.stack(kept)


def prune_config(n: int, keep: int, at: list[float]) -> SearchConfig:
    return SearchConfig(strategy="prune", n=n, keep=keep, at=at, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=T5_TOKENS)


def checkpoint_steps(searcher: Searcher, at: list[float]) -> list[int]:
    return [int(torch.nonzero(searcher.schedule.sigmas[:-1] <= sigma)[0]) for sigma in at]


def prune_label(n: int, keep: int, at: list[float]) -> str:
    return f"prune-and-continue n={n} keep={keep} at {','.join(f'{s:g}' for s in at)}, DiNa-LRM"


def prune_choice(searcher: Searcher, path: torch.Tensor, dina_final: torch.Tensor, noisy: dict[int, torch.Tensor], n: int, keep: int,
                 at: list[float]) -> tuple[int, int]:
    """(the returned candidate, the candidate steps run) of prune-and-continue replayed on ``path``."""
    alive, calls, previous = list(range(n)), 0, 0
    for step, survivors in zip(checkpoint_steps(searcher, at), prune_config(n, keep, at).survivors()):
        calls += (step - previous) * len(alive)
        scores = noisy[step][alive]
        order = torch.argsort(scores, descending=True, stable=True)[:survivors].tolist()
        alive, previous = sorted(alive[i] for i in order), step
    calls += (STEPS - previous) * len(alive)
    return alive[int(dina_final[alive].argmax())], calls


def bootstrap(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def unit_costs(searcher: Searcher, pixel, latents: torch.Tensor, prompt: str) -> dict:
    """FLOPs and measured CPU-seconds of one candidate step, one DiNa-LRM score, one decode + pixel score."""
    pipe, model = searcher.pipe, searcher.scorer.model
    text = searcher._conditioning(prompt, len(latents))
    step = lambda: searcher.policy.velocity(pipe.transformer, latents, float(searcher.schedule.sigmas[3]), text, GUIDANCE)  # noqa: E731
    states, pooled = searcher.scorer.prompt_encoder([prompt] * len(latents))
    decode_and_score = lambda: pixel(vae_decode(pipe.vae, latents) * 2 - 1, states, pooled)  # noqa: E731
    dina = lambda: searcher.scorer.score([prompt] * len(latents), latents=latents, u=0.4, seed=0)  # noqa: E731
    decode = lambda: vae_decode(pipe.vae, latents)  # noqa: E731
    costs = {}
    with torch.no_grad():
        for name, fn in (("step", step), ("dina", dina), ("pixel", decode_and_score), ("decode", decode)):
            fn()
            start = time.process_time()
            for _ in range(5):
                fn()
            costs[f"{name}_cpu_s"] = (time.process_time() - start) / 5 / len(latents)
        costs["step_flops"] = count_flops(step) / len(latents)
        costs["dina_flops"] = scoring_flops(model, tuple(latents.shape[1:]), states.shape[1], Setting((0.4,), 1))
        costs["pixel_flops"] = count_flops(decode_and_score) / len(latents)
        costs["decode_flops"] = count_flops(decode) / len(latents)
    return costs


def run_search_experiment(pipe, reward_dir, pixel: PixelReward, prompts: int = 32, seed: int = 7, verify: int = 2,
                          progress: bool = True) -> dict:
    """The experiment on ``prompts`` held-out toy prompts with the generator ``pipe``, the DiNa-LRM at
    ``reward_dir`` and the pixel reward ``pixel``; returns per-prompt judge scores and costs per strategy,
    the rank correlations and the unit costs (JSON-ready). The first ``verify`` prompts replay the
    pruning against the real :class:`Searcher` and must agree."""
    config = SearchConfig(strategy="prune", n=max(SIZES), keep=4, at=AT, steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=T5_TOKENS)
    searcher = Searcher.from_pretrained(reward_dir, pipe, config)
    pixel = pixel.eval()
    correlation_steps = {sigma: int(torch.nonzero(searcher.schedule.sigmas[:-1] <= sigma)[0]) for sigma in CORRELATION_SIGMAS}
    texts = [spec.text for spec in sample_prompts(prompts, "test", seed=seed)]
    judged = {key: [] for key in ["pixel", "dina", "judge"] + [prune_label(*setting) for setting in PRUNE]}
    calls_of = {prune_label(*setting): [] for setting in PRUNE}
    correlations = {sigma: [] for sigma in CORRELATION_SIGMAS}
    plain, started = [], time.perf_counter()
    for number, prompt in enumerate(texts):
        path = trajectories(searcher, prompt, seed=number)
        final = path[-1]
        with torch.no_grad():
            images = vae_decode(pipe.vae, final)
            judge = judge_scores(images, [prompt] * len(final))
            states, pooled = searcher.scorer.prompt_encoder([prompt] * len(final))
            pixel_scores = pixel(images * 2 - 1, states, pooled).reshape(-1)
            dina = searcher.final_scores(final, list(range(len(final))), prompt, seed=number)
            steps = {step for _, _, at in PRUNE for step in checkpoint_steps(searcher, at)} | set(correlation_steps.values())
            noisy = {step: searcher.noisy_scores(path[step], prompt, step) for step in steps}
        plain.append(float(judge[0]))
        for key, scores in (("pixel", pixel_scores), ("dina", dina), ("judge", judge)):
            judged[key].append([float(judge[int(scores[:n].argmax())]) for n in SIZES])
        for n, keep, at in PRUNE:
            chosen, calls = prune_choice(searcher, path, dina, noisy, n, keep, at)
            judged[prune_label(n, keep, at)].append(float(judge[chosen]))
            calls_of[prune_label(n, keep, at)].append(calls)
            if number < verify:
                real = Searcher(pipe, searcher.scorer, prune_config(n, keep, at)).run(prompt, seed=number)
                if (real.transformer_calls, real.chosen) != (calls, chosen):
                    raise RuntimeError(f"the pruning replay disagrees with the search on {prompt!r} (n={n}, keep={keep}, at={at})")
        for sigma, step in correlation_steps.items():
            correlations[sigma].append(float(np.nan_to_num(spearmanr(noisy[step].numpy(), judge.numpy()).statistic)))
        if progress:
            print(f"search experiment: {number + 1}/{len(texts)} prompts ({time.perf_counter() - started:.0f} s)", flush=True)
    units = unit_costs(searcher, pixel, path[-1][:8], texts[0])
    return {"prompts": texts, "rows": rows(plain, judged, calls_of, units), "correlations": {str(k): v for k, v in correlations.items()},
            "units": units, "steps": STEPS, "guidance": GUIDANCE}


def cost(units: dict, kind: str, candidates: int, steps: float, dina_scored: int = 0) -> tuple[float, float]:
    """(GFLOPs, CPU-seconds) per returned image."""
    flops = steps * units["step_flops"] + dina_scored * units["dina_flops"]
    seconds = steps * units["step_cpu_s"] + dina_scored * units["dina_cpu_s"]
    if kind == "pixel":
        flops += candidates * units["pixel_flops"]
        seconds += candidates * units["pixel_cpu_s"]
    if kind == "judge":
        flops += candidates * units["decode_flops"]
        seconds += candidates * units["decode_cpu_s"]
    return flops / 1e9, seconds


def rows(plain, judged, calls_of, units) -> dict:
    def row(values, gflops_seconds):
        return {"judge": [float(v) for v in values], "gflops": gflops_seconds[0], "cpu_s": gflops_seconds[1]}

    table = {"plain sampling": row(plain, cost(units, "dina", 1, STEPS))}
    for key, label in (("pixel", "best-of-{n}, pixel reward"), ("dina", "best-of-{n}, DiNa-LRM (clean, u=0.4)"),
                       ("judge", "best-of-{n}, judge (ceiling)")):
        values = np.array(judged[key])
        for column, n in enumerate(SIZES):
            table[label.format(n=n)] = row(values[:, column], cost(units, key, n, n * STEPS, n if key == "dina" else 0))
    for n, keep, at in PRUNE:
        label = prune_label(n, keep, at)
        scored = n + sum(prune_config(n, keep, at).survivors()[:-1]) + keep  # each checkpoint scores the candidates alive there, the end the survivors
        table[label] = row(judged[label], cost(units, "dina", n, float(np.mean(calls_of[label])), scored))
    return table


def search_markdown(results: dict) -> list[str]:
    """The strategy table, the rank correlations and the two comparisons the targets ask for."""
    table = results["rows"]
    lines = [f"{len(results['prompts'])} held-out toy prompts, {results['steps']} steps, guidance {results['guidance']}. "
             "Cost per returned image: GFLOPs counted, CPU-seconds composed "
             "from unit costs measured in the same run.", "",
             "| strategy | judge score | 95% interval | GFLOPs per image | CPU-s per image |", "|---|---|---|---|---|"]
    for label, row in table.items():
        values = np.array(row["judge"])
        low, high = bootstrap(values)
        lines.append(f"| {label} | {values.mean():.3f} | [{low:.3f}, {high:.3f}] | {row['gflops']:.2f} | {row['cpu_s']:.3f} |")
    lines += ["", "| sigma | rank correlation: noisy DiNa-LRM score vs final judge score (mean over prompts) | 95% interval |", "|---|---|---|"]
    for sigma, values in results["correlations"].items():
        low, high = bootstrap(np.array(values))
        lines.append(f"| {sigma} | {np.mean(values):.3f} | [{low:.3f}, {high:.3f}] |")
    return lines + [""] + comparisons(table)


def comparisons(table: dict) -> list[str]:
    """Prune vs the pixel best-of-N interpolated at equal GFLOPs (paired over prompts), and the cheapest
    prune setting that reaches DiNa-LRM best-of-16's judge score."""
    pixel = [table[f"best-of-{n}, pixel reward"] for n in SIZES]
    costs = np.array([row["gflops"] for row in pixel])
    lines = ["| prune setting | GFLOPs | judge minus the pixel best-of-N at equal GFLOPs | 95% interval |", "|---|---|---|---|"]
    for label, row in table.items():
        if not label.startswith("prune") or row["gflops"] > costs[-1]:
            continue
        values = np.array(row["judge"])
        at_equal = np.array([np.interp(row["gflops"], costs, [p["judge"][i] for p in pixel]) for i in range(len(values))])
        low, high = bootstrap(values - at_equal)
        lines.append(f"| {label} | {row['gflops']:.2f} | {(values - at_equal).mean():+.3f} | [{low:+.3f}, {high:+.3f}] |")
    best16 = table[f"best-of-{max(SIZES)}, DiNa-LRM (clean, u=0.4)"]
    target = np.mean(best16["judge"])
    reaching = [(row["gflops"], label) for label, row in table.items() if label.startswith("prune") and np.mean(row["judge"]) >= target]
    if reaching:
        cheapest, label = min(reaching)
        lines += ["", f"DiNa-LRM best-of-{max(SIZES)}: judge {target:.3f} at {best16['gflops']:.2f} GFLOPs; the cheapest prune setting "
                      f"reaching it: {label}, {cheapest:.2f} GFLOPs = {cheapest / best16['gflops']:.0%} of it."]
    else:
        lines += ["", f"DiNa-LRM best-of-{max(SIZES)}: judge {target:.3f} at {best16['gflops']:.2f} GFLOPs; no prune setting reaches it."]
    return lines
