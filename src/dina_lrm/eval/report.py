"""The evaluation's files: ``samples.csv``, ``pairs.csv``, ``summary.json``, ``report.md`` and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from dina_lrm.data.records import PreferenceGroup
from dina_lrm.eval.protocol import TIE_RULE, PairIndex


def write_samples_csv(path: Path, groups: list[PreferenceGroup], scores: dict[str, np.ndarray]) -> None:
    """One row per image: its prompt group, id, human rank and a score per setting."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group_id", "prompt", "image_id", "human_rank", *scores])
        flat = 0
        for group in groups:
            for image_id, rank in zip(group.image_ids, group.ranks):
                writer.writerow([group.group_id, group.prompt, image_id, rank, *(f"{s[flat]:.6g}" for s in scores.values())])
                flat += 1


def write_pairs_csv(path: Path, groups: list[PreferenceGroup], pairs: PairIndex, wins: dict[str, np.ndarray]) -> None:
    """One row per compared pair: the human-preferred image first, and the credit per setting."""
    images = [(g, image_id, rank) for g in groups for image_id, rank in zip(g.image_ids, g.ranks)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group_id", "prompt", "preferred_id", "other_id", "preferred_rank", "other_rank", *wins])
        for n, (a, b) in enumerate(zip(pairs.preferred, pairs.other)):
            group, preferred_id, preferred_rank = images[a]
            _, other_id, other_rank = images[b]
            writer.writerow([group.group_id, group.prompt, preferred_id, other_id, preferred_rank, other_rank,
                             *(w[n] for w in wins.values())])


def _band(ax, xs, entries, label, **style) -> None:
    accuracy = [e["accuracy"] for e in entries]
    ax.plot(xs, accuracy, marker="o", label=label, **style)
    ax.fill_between(xs, [e["ci"][0] for e in entries], [e["ci"][1] for e in entries], alpha=0.2, **style)


def _finish(fig, axes, path: Path) -> None:
    for ax in np.atleast_1d(axes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_u(summary: dict, path: Path) -> None:
    """DiNa-LRM's accuracy per noise level with its 95% band; other reward models as flat bands."""
    settings = summary["settings"]
    per_u = sorted(((s["levels"][0], s) for s in settings.values() if s["model"] == "DiNa-LRM" and len(s["levels"]) == 1 and s["draws"] == 1))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [u for u, _ in per_u]
    _band(ax, xs, [s for _, s in per_u], "DiNa-LRM")
    for name, s in settings.items():
        if s["model"] != "DiNa-LRM" and xs:
            _band(ax, [xs[0], xs[-1]], [s, s], name, linestyle="--")
    ax.set_xlabel("noise level u at scoring")
    ax.set_ylabel("pairwise accuracy (95% CI)")
    _finish(fig, ax, path)


def plot_ensemble_scaling(summary: dict, path: Path) -> None:
    """Test-time scaling: accuracy vs. noise draws at the best u, and vs. number of ensembled levels."""
    settings = [s for s in summary["settings"].values() if s["model"] == "DiNa-LRM"]
    best = next(s for s in settings if s["levels"] == [summary["best_u"]] and s["draws"] == 1)
    draws = [best] + sorted((s for s in settings if s["levels"] == [summary["best_u"]] and s["draws"] > 1), key=lambda s: s["draws"])
    levels = [best] + sorted((s for s in settings if len(s["levels"]) > 1), key=lambda s: len(s["levels"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, entries, xs, label in (
        (axes[0], draws, [s["draws"] for s in draws], f"noise draws averaged (u={summary['best_u']:g})"),
        (axes[1], levels, [len(s["levels"]) for s in levels], "noise levels ensembled in the head"),
    ):
        ax.errorbar(xs, [s["accuracy"] for s in entries], capsize=3, marker="o",
                    yerr=np.abs(np.array([s["ci"] for s in entries]).T - [s["accuracy"] for s in entries]))
        ax.axhline(best["accuracy"], color="grey", linestyle=":", label=f"single draw, u={summary['best_u']:g}")
        ax.set_xlabel(label)
        ax.set_xticks(xs)
    axes[0].set_ylabel("pairwise accuracy (95% CI)")
    _finish(fig, axes, path)


def plot_calibration(calibration: dict, path: Path) -> None:
    bins = calibration["bins"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle=":", label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["agreement"] for b in bins], marker="o", label=calibration["setting"])
    for b in bins:
        ax.annotate(str(b["pairs"]), (b["confidence"], b["agreement"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("model's probability for its favourite")
    ax.set_ylabel("share of pairs where humans agree")
    ax.set_title(f"ECE {calibration['ece']:.3f} (labels: pairs per bin)", fontsize=9)
    _finish(fig, ax, path)


def _cost(entry: dict) -> list[str]:
    flops = f"{entry['gflops_per_image']:.3g}" if "gflops_per_image" in entry else "n/a"
    return [f"{entry['images_per_s']:.1f}", f"{entry['peak_mib']:.0f}", flops]


def _protocol_lines(summary: dict) -> list[str]:
    """Which rule each accuracy column follows."""
    lines = [f"Ours: {TIE_RULE}", ""]
    official = next((e["official"]["metric"] for e in summary["settings"].values() if "official" in e), None)
    if official:
        threshold = summary["config"].get("tie_threshold", 0.0)
        lines += [f"Official: {official}, as the benchmark's own evaluation code computes it (dina_lrm/eval/official.py"
                  + (f"; predicted tie when |P(a) - P(b)| <= {threshold:g}" if summary["benchmark"]["format"] in ("pickapic", "genai_bench") else "")
                  + f"; {summary['benchmark'].get('tied_groups_scored', 0)} all-tied pairs scored for it only).", ""]
    return lines


def report_markdown(summary: dict) -> str:
    bench = summary["benchmark"]
    lines = [
        f"# Evaluation: {bench['format']} ({bench['input']})", "",
        f"Read {len(bench.get('files', []))} files{' of split ' + repr(bench['split']) if bench.get('split') else ''}: "
        f"{', '.join(bench.get('files', [])[:5])}{', ...' if len(bench.get('files', [])) > 5 else ''}.", "",
        f"{bench['prompts']} prompts, {bench['images']} images, **{bench['pairs']} compared pairs**. Left out: "
        f"{bench['tied_pairs']} pairs tied in human rank, {bench['all_tied_prompts']} prompts whose images are all tied, "
        f"invalid rows {bench['invalid_rows'] or 'none'}, {bench['missing_images']} missing images "
        f"({bench['groups_dropped_for_missing']} prompts dropped)."
        + (f" {bench['images_outside_root']} images read from outside the images root (--allow-outside-root)."
           if bench.get("images_outside_root") else ""), "",
        *_protocol_lines(summary),
    ]
    protocol = summary["config"].get("protocol", "both")
    official = next((e["official"]["metric"] for e in summary["settings"].values() if "official" in e), None)
    ours = protocol != "official" or official is None
    head = ["setting"] + (["accuracy (ours)", "95% CI", "pairs", "prompts"] if ours else []) + ([f"{official} (official)"] if official else [])
    lines += ["| " + " | ".join(head + ["latents (images)/s", "peak MiB", "GFLOPs/image"]) + " |", "|" + "---|" * (len(head) + 3)]
    for name, s in summary["settings"].items():
        cells = [name] + ([f"{s['accuracy']:.4f}", f"[{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]", str(s["pairs"]), str(s["prompts"])] if ours else [])
        cells += [f"{s['official']['accuracy']:.4f}"] if official else []
        lines.append("| " + " | ".join(cells + _cost(s)) + " |")
    processes = next(iter(summary["settings"].values()))["processes"]
    lines += ["", f"Throughput and peak memory were measured on this run's machine ({processes} process(es); peak memory is "
              "the CUDA peak allocation on a GPU, the process's resident set on CPU). GFLOPs are analytic: backbone blocks, "
              "LoRA, patch embedding and reward head at each image's latent size; text encoders excluded.", ""]
    if summary["best_u"] is not None:
        cal = summary["calibration"]
        lines += [f"Best single noise level: u = {summary['best_u']:g}.", "",
                  "![accuracy vs u](accuracy_vs_u.png)", "", "![ensembles](ensemble_scaling.png)", "",
                  f"Calibration of {cal['setting']} (the model's pair probability under its training loss vs. how often "
                  f"humans agree): ECE {cal['ece']:.4f}.", "", "![calibration](calibration.png)", ""]
    lines += ["Files: `samples.csv` (one row per image, a score per setting), `pairs.csv` (one row per compared pair, "
              "its credit per setting), `summary.json`."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, summary: dict, groups: list[PreferenceGroup], pairs: PairIndex, scores: dict[str, np.ndarray]) -> None:
    names = list(summary["settings"])
    write_samples_csv(out / "samples.csv", groups, {n: scores[n] for n in names})
    write_pairs_csv(out / "pairs.csv", groups, pairs, {n: pairs.wins(scores[n]) for n in names})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["best_u"] is not None:
        plot_accuracy_vs_u(summary, out / "accuracy_vs_u.png")
        plot_ensemble_scaling(summary, out / "ensemble_scaling.png")
        plot_calibration(summary["calibration"], out / "calibration.png")
    (out / "report.md").write_text(report_markdown(summary))
