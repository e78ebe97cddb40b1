"""The demo's ``report.md`` and its plots."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dina_lrm import Scorer
from dina_lrm_toyworld.search_experiment import search_markdown

GRID_SAMPLES = 16
SAMPLE_U = 0.4


def plot_accuracy_vs_u(accuracy: dict, pixel_method: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, result in accuracy.items():
        if "per_u" in result:
            levels = [float(u) for u in result["per_u"]]
            ax.plot(levels, list(result["per_u"].values()), marker="o", label=name)
    ax.axhline(accuracy[pixel_method]["accuracy"], color="grey", linestyle="--", label=pixel_method)
    ax.set_xlabel("noise level u at scoring")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(histories: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in histories.items():
        evals = [h for h in history if "heldout_accuracy" in h]
        logs = [h for h in history if "loss" in h]
        axes[0].plot([h["step"] for h in evals], [h["heldout_accuracy"] for h in evals], marker=".", label=name)
        axes[1].plot([h["step"] for h in logs], [h["train_accuracy"] for h in logs], alpha=0.7, label=name)
    axes[0].set_title("held-out accuracy (monitor subset)")
    axes[1].set_title("training-batch accuracy (noisy labels)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(samples, scorer: Scorer, path: Path) -> None:
    """Held-out generator samples with the judge's score and the reward's (normalised) score."""
    shown = samples[:: max(1, len(samples) // GRID_SAMPLES)][:GRID_SAMPLES]
    rewards = scorer.score([c.prompt for c in shown], latents=torch.stack([c.latent for c in shown]), u=SAMPLE_U, seed=0).normalized
    columns = 4
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, candidate, reward in zip(axes.flat, shown, rewards):
        ax.imshow(candidate.image, interpolation="nearest")
        title = "\n".join(textwrap.wrap(candidate.prompt, 28))
        ax.set_title(f"{title}\njudge {candidate.score:.2f} | reward {reward:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(accuracy: dict, pixel_method: str) -> list[str]:
    dina = {k: v for k, v in accuracy.items() if "per_u" in v}
    levels = list(next(iter(dina.values()))["per_u"])
    lines = ["| method | " + " | ".join(f"u={u}" for u in levels) + " | ensemble [95% CI] | best single u [95% CI] |",
             "|---|" + "---|" * (len(levels) + 2)]
    for name, result in dina.items():
        cells = [f"{result['per_u'][u]:.3f}" for u in levels]
        best = result["per_u"][result["best_u"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['ensemble']:.3f} {_interval(result['ensemble_ci'])} | "
                     f"{best:.3f} {_interval(result['best_ci'])} (u={result['best_u']}) |")
    pixel = accuracy[pixel_method]
    lines.append(f"| {pixel_method} | " + " | ".join("–" for _ in levels) + f" | – | {pixel['accuracy']:.3f} {_interval(pixel['ci'])} |")
    return lines


def _interval(bounds: list[float]) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _budget(config: dict, histories: dict, pixel_method: str) -> str:
    return (f"{config['steps']} steps each, the pixel reward {histories[pixel_method][-1]['step']} steps at the same training "
            "FLOPs; measured training seconds: " + ", ".join(f"{name} {h[-1]['seconds']:.0f} s" for name, h in histories.items()))


def benchmark_section(result: dict) -> list[str]:
    best = result["settings"][f"DiNa-LRM u={result['best_u']:g}"]
    best_ensemble_name, best_ensemble = max(result["settings"].items(), key=lambda item: item[1]["accuracy"])
    return [
        f"`dina-lrm eval` on a judge-ranked toy benchmark (clean renders and corruptions, read from PNG files; "
        f"{result['pairs']} compared pairs): best single u = {result['best_u']:g}, accuracy {best['accuracy']:.3f} "
        f"{_interval(best['ci'])}; best setting {best_ensemble_name}: {best_ensemble['accuracy']:.3f} {_interval(best_ensemble['ci'])}. "
        "Full table, costs, test-time scaling and calibration: [eval/report.md](eval/report.md).",
        "",
    ]


def write_report(out: Path, summary: dict, samples, scorer: Scorer) -> str:
    accuracy, data, config = summary["accuracy"], summary["data"], summary["config"]
    pixel_method = next(k for k, v in accuracy.items() if "accuracy" in v)
    plot_accuracy_vs_u(accuracy, pixel_method, out / "accuracy_vs_u.png")
    plot_training_curves(summary["histories"], out / "training_curves.png")
    plot_samples(samples, scorer, out / "samples.png")
    main = accuracy["DiNa-LRM (Thurstone)"]
    best_single = max(main["per_u"].values())
    lines = [
        "# dina-lrm demo: the toy world",
        "",
        f"Generator: `{summary['generator']}`. Held-out prompts use colour-shape combinations never seen in training.",
        "",
        "## Data",
        "",
        "| split | prompts | pairs | from generations | label flips | generator judge score | clauses satisfied | quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in ("train", "test"):
        d = data[split]
        lines.append(
            f"| {split} | {d['prompts']} | {d['pairs']} | {d['pairs_from_generations']} | {d['label_flip_rate']:.1%} | "
            f"{d['generator_judge_score']:.3f} | {d['generator_clause_rate']:.1%} | {d['generator_quality']:.3f} |"
        )
    world = data["world"]
    lines += [
        "",
        (
            f"Judge on clean held-out renders: {world['judge_clause_accuracy_on_renders']:.1%} of clauses right. "
            f"VAE reconstruction PSNR on them: {world['vae_psnr_db']:.1f} dB."
        ),
        "",
        "## Held-out pairwise accuracy (noise-free judge labels)",
        "",
        f"Trained on the same pairs: {_budget(config, summary['histories'], pixel_method)}.",
        "",
        *results_table(accuracy, pixel_method),
        "",
        (
            f"Ensemble levels {list(config['ensemble_levels'])}: {main['ensemble']:.3f} "
            f"({main['ensemble'] - best_single:+.3f} vs. the best single u, "
            f"{main['ensemble'] - sum(main['per_u'].values()) / len(main['per_u']):+.3f} vs. the mean over u)."
        ),
        "The two latents of a pair share one noise draw (seeded by the pair), as in training; a tie in score counts half. Intervals: 95% percentile "
        "bootstrap over held-out prompts (1000 resamples).",
        "",
        "By pair source (DiNa-LRM at its best u vs. the pixel reward):",
        "",
        "| source | pairs | DiNa-LRM | pixel |",
        "|---|---|---|---|",
        *[f"| {s} | {v['pairs']} | {v['DiNa-LRM']:.3f} | {v['pixel']:.3f} |" for s, v in accuracy["by_source"].items()],
        "",
        *benchmark_section(summary["benchmark_eval"]),
        "Parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in summary["parameters"].items()) + ".",
        "",
        "![accuracy vs u](accuracy_vs_u.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        f"Held-out generator samples, judge score and DiNa-LRM reward (normalised, u={SAMPLE_U}):",
        "",
        "![samples](samples.png)",
        "",
        "## Reward-guided sampling",
        "",
        "The generator samples N candidates; DiNa-LRM prunes them on their noisy latents mid-trajectory (no decode) and "
        "only the survivors finish (`dina-lrm sample`, docs/search.md). The returned image's judge score against its cost:",
        "",
        *search_markdown(summary["search"]),
        "",
        "## Wall time (s)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()],
        "",
    ]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    return report
