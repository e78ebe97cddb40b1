"""``ablations.md`` and its plots: the paper's reward-model table, reproduced in the toy world."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

PAPER = {  # HPDv2 accuracy (%) of the paper's rows (spec/paper-results.md); None where not published
    "DiNa-LRM (full)": "82.13",
    "constant variance": "78.72",
    "Bradley-Terry": "n/p",
    "clean only (u = 0)": "59.20",
    "frozen backbone (head only)": "n/a (HPDv3 73.52 vs 75.04)",
    "full fine-tune": "n/p",
    "ensemble {0.2,0.5,0.7}, calibrated": "84.31",
    "ensemble {0.2,0.5,0.7}, constant variance": "78.16",
    "LRM-style (LPO: pooled cosine, BT)": "71.19 (LRM-SDXL)",
    "pixel reward (decodes), equal FLOPs": "83.27-85.36 (VLM rewards)",
}


def _pct(entry: dict) -> str:
    low, high = entry["ci"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def table_lines(table: dict) -> list[str]:
    lines = ["| row | held-out, all pairs | held-out, generated pairs | toy benchmark | best u | per seed | GFLOPs / image | "
             "training steps | training CPU-s | paper (HPDv2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        seeds = ", ".join(f"{100 * a:.1f}" for a in row["per_seed"])
        lines.append(f"| {name} | {_pct(row['heldout'])} | {_pct(row['generated'])} | {_pct(row['benchmark'])} | {row['best']} | "
                     f"{seeds} | {row['gflops_per_image']:.4f} | {row['steps']} | {row['train_seconds']:.0f} | {PAPER.get(name, '')} |")
    return lines


def subset_lines(table: dict, column: str) -> list[str]:
    """Accuracy on subsets of the held-out pairs (``clauses`` or ``by_gap``), a row per table row."""
    first = next(iter(table.values()))[column]
    lines = ["| row | " + " | ".join(f"{k} ({v['pairs']} pairs)" for k, v in first.items()) + " |", "|---|" + "---|" * len(first)]
    for name, row in table.items():
        cells = ["" if v["accuracy"] is None else f"{100 * v['accuracy']:.1f}" for v in row[column].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def claim_lines(claims: list[dict]) -> list[str]:
    lines = ["| the paper's direction | left | right | reproduced (intervals apart) | paired difference [95% CI] |", "|---|---|---|---|---|"]
    for c in claims:
        left = f"{c['left']}: {100 * c['left_accuracy']:.1f} [{100 * c['left_ci'][0]:.1f}, {100 * c['left_ci'][1]:.1f}]"
        right = f"{c['right']}: {100 * c['right_accuracy']:.1f} [{100 * c['right_ci'][0]:.1f}, {100 * c['right_ci'][1]:.1f}]"
        where = " (mean over u >= 0.4)" if c["where"] == "u>=0.4" else ""
        difference = f"{100 * c['difference']:+.1f} [{100 * c['difference_ci'][0]:+.1f}, {100 * c['difference_ci'][1]:+.1f}]"
        lines.append(f"| {c['claim']}{where} ({c['comparison']}) | {left} | {right} | {'yes' if c['reproduced'] else '**no**'} | {difference} |")
    return lines


def plot_accuracy_vs_u(table: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, row) in enumerate(table.items()):
        color = f"C{i % 10}"
        if row["per_u"]:
            ax.plot([float(u) for u in row["per_u"]], list(row["per_u"].values()), marker="o", color=color, label=name)
        else:
            ax.axhline(row["heldout"]["accuracy"], linestyle="--", linewidth=1, color=color, label=f"{name} (one setting)")
    ax.set_xlabel("noise level u at scoring")
    ax.set_ylabel("held-out pairwise accuracy (mean of seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clauses(table: dict, path: Path) -> None:
    kinds = [k for k in next(iter(table.values()))["clauses"] if next(iter(table.values()))["clauses"][k]["pairs"]]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(kinds)), 4))
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.items()):
        values = [row["clauses"][k]["accuracy"] or 0.0 for k in kinds]
        ax.bar(np.arange(len(kinds)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_ylabel("held-out accuracy on pairs that differ in the clause")
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.arange(0, 1.01, 0.2))
    ax.legend(fontsize=6, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_ablation_report(out: Path, summary: dict) -> str:
    table, config, data = summary["table"], summary["config"], summary["data"]
    plot_accuracy_vs_u(table, out / "ablations_accuracy_vs_u.png")
    plot_clauses(table, out / "ablations_clauses.png")
    lines = [
        "# DiNa-LRM ablations in the toy world",
        "",
        f"{data['train_pairs']} training pairs ({100 * data['label_flip_rate']:.1f}% of labels flipped by the noisy rater), "
        f"{len(data['heldout']['groups'])} held-out pairs ({sum(s == 'generated' for s in data['heldout']['sources'])} of "
        f"two generator samples), {len(data['benchmark']['groups'])} benchmark pairs. {config['steps']} optimizer steps per "
        f"row (batch {config['batch_size']}, lr {config['learning_rate']}); seeds {config['seeds']}. Accuracies in %, "
        "the mean over seeds, with 95% bootstrap intervals over held-out prompts. The best u is picked on the held-out "
        "pairs, the same way for every row; the benchmark is read at that u. Training CPU-s are measured, beside the fixed step count.",
        "",
        *table_lines(table),
        "",
        "## The paper's directions",
        "",
        *claim_lines(summary["claims"]),
        "",
        "## Accuracy per clause (held-out pairs whose two images differ in it, at the row's best u)",
        "",
        *subset_lines(table, "clauses"),
        "",
        "## Accuracy by the judge-score gap of the pair (one clause of a relation prompt moves the score by about 0.095)",
        "",
        *subset_lines(table, "by_gap"),
        "",
        "![accuracy vs u](ablations_accuracy_vs_u.png)",
        "",
        "![per clause](ablations_clauses.png)",
        "",
        f"Wall time: {summary['timings_s']['total']:.0f} s (data and costs {summary['timings_s']['data_and_costs']:.0f} s).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "ablations.md").write_text(text)
    return text
