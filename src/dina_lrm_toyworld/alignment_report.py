"""``alignment.md`` and its plots for the toy-world alignment experiment."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

PAPER_COST = [  # the paper's ReFL cost per step on SD3.5-M at 1024^2 (spec/paper-results.md)
    ("peak GPU memory", "80.4 GB", "39.1 GB", "51.4 %"),
    ("reward forward", "~11 TFLOPs", "~3 TFLOPs", "~71 %"),
    ("update (backward)", "~34 TFLOPs", "~18 TFLOPs", "~46 %"),
    ("sampling", "~209.5 TFLOPs", "~209.5 TFLOPs", "same"),
]


def validation_curve(histories: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds at each evaluation: (steps, training CPU-seconds, validation judge gain over step 0)."""
    per_seed = [[r for r in history if "eval_judge" in r] for history in histories]
    count = min(len(evals) for evals in per_seed)
    steps = np.array([per_seed[0][i]["step"] for i in range(count)])
    seconds = np.mean([[evals[i]["train_cpu_seconds"] for i in range(count)] for evals in per_seed], axis=0)
    gains = np.mean([[evals[i]["eval_judge"] - evals[0]["eval_judge"] for i in range(count)] for evals in per_seed], axis=0)
    return steps, seconds, gains


def efficiency(histories: dict, method: str, at: str = "final") -> dict | None:
    """CPU-seconds DiNa-LRM needs to reach the pixel reward's validation judge gain (``at`` its final
    evaluation, or its ``best``; curves averaged over seeds), as a share of the CPU-seconds the pixel
    reward took to get there (the paper: DiNa-LRM passes HPSv3's final score at ~30% of its steps).
    None without both runs; ``ratio`` None when the pixel reward gained nothing or DiNa-LRM never reached it."""
    dina, pixel = f"{method} + DiNa-LRM", f"{method} + pixel reward"
    if dina not in histories or pixel not in histories:
        return None
    _, pixel_seconds, pixel_gains = validation_curve(histories[pixel])
    steps, dina_seconds, dina_gains = validation_curve(histories[dina])
    best = int(np.argmax(pixel_gains)) if at == "best" else len(pixel_gains) - 1
    target = float(pixel_gains[best])
    reached = np.nonzero(dina_gains >= target)[0] if target > 0 else []
    seconds = float(dina_seconds[reached[0]]) if len(reached) else None
    return {"pixel_best_gain": target, "pixel_cpu_seconds": float(pixel_seconds[best]), "dina_cpu_seconds_to_reach": seconds,
            "dina_step_to_reach": int(steps[reached[0]]) if len(reached) else None,
            "ratio": seconds / float(pixel_seconds[best]) if seconds is not None else None}


LINESTYLES = {"NFT": "-", "ReFL": "--", "GRPO": "-.", "SFT": ":"}


def plot_curves(histories: dict, path: Path, base: str) -> Path:
    figure, (by_seconds, by_step, own) = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, runs in histories.items():
        steps, seconds, gains = validation_curve(runs)
        style = dict(linestyle=LINESTYLES.get(name.split(" ")[0], ":"), marker="o", markersize=3, label=name)
        by_seconds.plot(seconds, gains, **style)
        by_step.plot(steps, gains, **style)
        rewards = np.mean([[r["eval_reward"] - evals[0]["eval_reward"] for r in evals[: len(steps)]]
                           for evals in ([r for r in h if "eval_judge" in r] for h in runs)], axis=0)
        own.plot(steps, rewards, **style)
    by_seconds.set_xlabel("training CPU-seconds (sampling + reward + update)")
    by_step.set_xlabel("optimizer steps")
    own.set_xlabel("optimizer steps")
    by_seconds.set_ylabel("validation judge, change from the base (mean of seeds)")
    by_step.set_ylabel("validation judge change")
    own.set_ylabel("the run's own reward on validation, change")
    for axis in (by_seconds, by_step, own):
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.grid(alpha=0.3)
    own.legend(fontsize=7)
    figure.suptitle(f"Aligning the {base} toy generator: validation judge and reward")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_clauses(runs: dict, path: Path) -> Path:
    kinds = list(next(iter(runs.values()))["clauses"])
    figure, axis = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / (len(runs) + 1)
    base = next(iter(runs.values()))["clauses"]
    axis.bar(np.arange(len(kinds)), [base[k]["base"] for k in kinds], width, label="base", color="lightgrey")
    for i, (name, run) in enumerate(runs.items(), start=1):
        axis.bar(np.arange(len(kinds)) + i * width, [run["clauses"][k]["best"] for k in kinds], width, label=name)
    axis.set_xticks(np.arange(len(kinds)) + width * len(runs) / 2, kinds)
    axis.set_ylabel("share satisfied on test prompts (quality: judge's quality)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=3)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def setting(config: dict, method: str, key: str):
    """An AlignConfig key of the experiment's runs of ``method``: the override, else the default, else the common setting."""
    for source in (config["settings"].get(method, {}), config["defaults"][method], config["common"]):
        if key in source:
            return source[key]
    return 0


def gate_lines(runs: dict) -> list[str]:
    """The biased base's gate: SFT on renders lifts it (>= +0.10), NFT with a constant reward leaves it (within 0.01)."""
    lines = []
    if "SFT on renders" in runs:
        run = runs["SFT on renders"]
        low, high = run["test_gain_ci"]
        lines.append(f"* Fine-tuning on ground-truth renders, the alignment budget: test judge {run['test_gain']:+.3f} [{low:+.3f}, {high:+.3f}] "
                     f"at the kept checkpoint, {run['test_final_gain']:+.3f} at the end (gate: >= +0.10: "
                     f"{'passed' if run['test_gain'] >= 0.10 else 'failed'}).")
    if "NFT + constant reward" in runs:
        run = runs["NFT + constant reward"]
        low, high = run["test_final_gain_ci"]
        lines.append(f"* DiffusionNFT with every reward equal (r = 1/2): test judge {run['test_final_gain']:+.3f} [{low:+.3f}, {high:+.3f}] "
                     f"at the end (gate: within 0.01: {'passed' if abs(run['test_final_gain']) <= 0.01 else 'failed'}).")
    return lines


def efficiency_lines(histories: dict) -> list[str]:
    lines = []
    for method in ("NFT", "ReFL", "GRPO"):
        for at in ("final", "best"):
            found = efficiency(histories, method, at)
            if found is None:
                continue
            if found["pixel_best_gain"] <= 0:
                reached = "the pixel reward did not raise the validation judge, so there is nothing to reach"
            elif found["ratio"] is None:
                reached = "DiNa-LRM never reached it"
            else:
                reached = (f"DiNa-LRM reached it at step {found['dina_step_to_reach']}, {found['dina_cpu_seconds_to_reach']:.0f} CPU-s = "
                           f"{found['ratio']:.2f} of the pixel reward's {found['pixel_cpu_seconds']:.0f} CPU-s")
            lines.append(f"* {method}, the pixel reward's {at} validation gain {found['pixel_best_gain']:+.3f}: {reached}.")
    return lines


def write_alignment_report(out: Path, result: dict, run_dirs: dict[str, Path]) -> Path:
    runs, histories, config = result["runs"], result["histories"], result["config"]
    plot_curves(histories, out / "alignment.png", config["base"])
    plot_clauses(runs, out / "alignment_clauses.png")
    for name, directory in run_dirs.items():  # sample grids of the first seed on test prompts: base, kept and final weights
        for which in ("base", "best", "final"):
            source = directory / "samples" / f"test_{which}.png"
            if source.is_file():
                shutil.copy(source, out / f"samples_{name.replace(' + ', '_').replace(' ', '_').lower()}_{which}.png")
    rewards = result["rewards"]
    lines = [
        "# Toy-world alignment",
        "",
        f"Base policy: the {config['base']} toy generator; test judge {next(iter(runs.values()))['test_judge_base']:.3f} on "
        f"{config['num_test_prompts']} test prompts (no classifier-free guidance, {config['eval_sampling_steps']} Euler steps). "
        f"Rewards trained {config['reward_steps']} steps on {rewards['pairs']['train']} pairs of the base's samples: held-out pairwise "
        f"accuracy DiNa-LRM {rewards['heldout_accuracy']['DiNa-LRM']:.3f}, pixel reward {rewards['heldout_accuracy']['pixel reward']:.3f}. "
        f"Seeds {config['seeds']} (the gate's runs: the first); the kept checkpoint is the best of the validation judge "
        f"({config['num_val_prompts']} prompts, every {setting(config, 'nft', 'eval_every')} steps); test prompts never pick.",
        "",
        "The gate of the base:",
        "",
        *gate_lines(runs),
        "",
        "| run | steps | CPU-s/step | test judge base | kept | Δ (95% CI over prompts) | Δ per seed | final | kept at step | reward/judge diverge at |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        low, high = run["test_gain_ci"]
        lines.append(
            f"| {name} | {run['steps']} | {run['cpu_s_per_step']:.2f} | {run['test_judge_base']:.3f} | {run['test_judge_best']:.3f} | "
            f"{run['test_gain']:+.3f} [{low:+.3f}, {high:+.3f}] | {', '.join(f'{g:+.3f}' for g in run['test_gain_per_seed'])} | "
            f"{run['test_judge_final']:.3f} | {run['best_steps']} | {run['divergence_steps']} |"
        )
    kinds = list(next(iter(runs.values()))["clauses"])
    lines += ["", "Per clause on the test prompts, base -> kept checkpoint (share satisfied; quality is the judge's quality score):", "",
              "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{run['clauses'][k]['base']:.2f} -> {run['clauses'][k]['best']:.2f}" for k in kinds) + " |")
    lines += ["", "Efficiency: CPU-seconds for DiNa-LRM to reach the pixel reward's validation judge gain (curves averaged over seeds):", "",
              *efficiency_lines(histories)]
    lines += ["", "Cost per training step (measured on this machine):", "",
              "| run | reward ms/sample | sampling s/step | update s/step | peak MiB (resident) |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['reward_ms_per_sample']:.2f} | {run['sampling_s_per_step']:.2f} | {run['update_s_per_step']:.2f} | "
                     f"{run['peak_memory_mib']:.0f} |")
    flops = result["flops"]
    lines += ["", "Per sample of a ReFL step (FLOPs counted by torch's FlopCounterMode; memory: the reward's own weights and the "
              "activations its backward keeps), beside the paper's SD3.5-M table:", "",
              "| per sample | pixel reward (decodes) | DiNa-LRM (latents) | reduction | paper, HPSv3 | paper, DiNa-LRM | paper, reduction |",
              "|---|---|---|---|---|---|---|"]
    for (label, key), paper in zip((("peak memory", "memory_mib"), ("reward forward", "reward_forward"),
                                    ("update (backward)", "update"), ("sampling", "sampling")), PAPER_COST):
        pixel, dina = flops["pixel"][key], flops["dina"][key]
        unit = "MiB" if key == "memory_mib" else "MFLOPs"
        scale = 1 if key == "memory_mib" else 1e-6
        reduction = f"{100 * (1 - dina / pixel):.0f} %" if pixel else "-"
        lines.append(f"| {label} | {pixel * scale:.1f} {unit} | {dina * scale:.1f} {unit} | {reduction} | {paper[1]} | {paper[2]} | {paper[3]} |")
    lines += ["", "![validation judge vs CPU-seconds and steps](alignment.png)", "", "![clauses](alignment_clauses.png)", "",
              "Sample grids of the first seed on the first 16 test prompts: `samples_<run>_base.png`, `_best.png` (kept), "
              "`_final.png`.", ""]
    path = out / "alignment.md"
    path.write_text("\n".join(lines))
    return path
