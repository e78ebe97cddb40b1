"""The toy world's rewards for alignment (the judge, the pixel reward model) and the experiment:
align the shipped generator with DiNa-LRM on latents, with the pixel reward, and with the judge itself,
for the same wall-clock budget, judged on held-out prompts."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dina_lrm.align.rewards import DecodedImageReward, RewardSpec
from dina_lrm.align.trainer import AlignConfig, align
from dina_lrm.models.sd3_text import SD3PromptEncoder
from dina_lrm.toyworld.generator import T5_TOKENS
from dina_lrm.toyworld.judge import Judge
from dina_lrm.toyworld.pixel_reward import PixelReward

JUDGE = Judge()


def judge_scores(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The judge's score of (N, 3, H, W) images in [0, 1]."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([result.score for result in JUDGE.batch(list(pixels), prompts)], dtype=torch.float32)


def save_pixel_reward(model: PixelReward, path: str | Path) -> Path:
    path = Path(path)
    widths = {"text_width": str(model.text_proj.in_features), "pooled_width": str(model.stages[0].film.in_features)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=widths)
    return path


def load_pixel_reward(path: str | Path) -> PixelReward:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pixel reward not found: {path}")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "text_width" not in metadata:
        raise ValueError(f"{path} is not a saved toy pixel reward (no text_width metadata)")
    model = PixelReward(int(metadata["text_width"]), int(metadata["pooled_width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def pixel_reward(path: str | Path, pipe, device) -> DecodedImageReward:
    model = load_pixel_reward(path).to(device)
    encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        states, pooled = encoder(prompts)
        return model(images * 2 - 1, states, pooled)

    return DecodedImageReward(pipe.vae, fn, "pixel reward (decodes)", differentiable=True)


# The experiment ------------------------------------------------------------------------------

RUNS = {  # name: (method, reward spec builder)
    "GRPO + DiNa-LRM (latents)": ("grpo", lambda reward_dir, pixel_path: RewardSpec(kind="dina", path=str(reward_dir), u=0.4)),
    "GRPO + pixel reward (decodes)": ("grpo", lambda reward_dir, pixel_path: RewardSpec(kind="toy_pixel", path=str(pixel_path))),
    "GRPO + judge (upper bound)": ("grpo", lambda reward_dir, pixel_path: RewardSpec(kind="toy_judge")),
    "DRaFT-1 + DiNa-LRM (latents)": ("draft", lambda reward_dir, pixel_path: RewardSpec(kind="dina", path=str(reward_dir), u=0.4)),
    "DRaFT-1 + pixel reward (decodes)": ("draft", lambda reward_dir, pixel_path: RewardSpec(kind="toy_pixel", path=str(pixel_path))),
}


@dataclass
class ToyAlignmentConfig:
    budget_s: float = 90.0  # training seconds (sampling + reward + update) per run
    eval_every: int = 10
    num_eval_prompts: int = 48
    grpo_learning_rate: float = 3e-4
    draft_learning_rate: float = 1e-4
    prompts_per_step: int = 8
    seed: int = 0
    runs: list[str] = field(default_factory=lambda: list(RUNS))


def align_config(name: str, reward_dir: Path, pixel_path: Path, generator_dir: Path, out: Path, config: ToyAlignmentConfig) -> AlignConfig:
    method, spec = RUNS[name]
    return AlignConfig(
        method=method, generator=str(generator_dir), reward=spec(reward_dir, pixel_path), judge=RewardSpec(kind="toy_judge"),
        prompts="toyworld:train", eval_prompts="toyworld:test", num_eval_prompts=config.num_eval_prompts, out=str(out),
        seed=config.seed, max_steps=100_000, budget_s=config.budget_s, prompts_per_step=config.prompts_per_step, group_size=4,
        train_sampling_steps=8, eval_sampling_steps=12, guidance_scale=4.0, noise_level=0.7, clip_range=1e-3,
        learning_rate=config.grpo_learning_rate if method == "grpo" else config.draft_learning_rate,
        eval_every=config.eval_every, checkpoint_every=100_000, max_sequence_length=T5_TOKENS,
    )


def run_alignment_experiment(out: str | Path, reward_dir: str | Path, pixel_path: str | Path, generator_dir: str | Path,
                             config: ToyAlignmentConfig | None = None) -> dict:
    """Every run in ``config.runs`` for the same training-time budget; writes alignment.md/.json/.png under ``out``."""
    config = config or ToyAlignmentConfig()
    out = Path(out)
    histories = {}
    for name in config.runs:
        run_dir = out / name.split(" (")[0].replace(" + ", "_").replace(" ", "_").lower()
        if run_dir.exists():
            shutil.rmtree(run_dir)
        histories[name] = align(align_config(name, Path(reward_dir), Path(pixel_path), Path(generator_dir), run_dir, config))
    summary = {"config": asdict(config), "runs": {name: summarise(history) for name, history in histories.items()},
               "histories": histories}
    (out / "alignment.json").write_text(json.dumps(summary, indent=1))
    plot_alignment(histories, out / "alignment.png")
    (out / "alignment.md").write_text(alignment_table(summary))
    return summary


def summarise(history: list[dict]) -> dict:
    steps = [r for r in history if "reward_mean" in r]
    evals = [r for r in history if "eval_judge" in r]
    return {
        "steps": len(steps),
        "train_seconds": history[-1]["train_seconds"],
        "reward_ms_per_sample": 1000 * sum(r["time_reward_s"] for r in steps) / sum(r["samples"] for r in steps),
        "sampling_s_per_step": float(np.mean([r["time_sampling_s"] for r in steps])),
        "update_s_per_step": float(np.mean([r["time_update_s"] for r in steps])),
        "peak_memory_mib": float(max(r["peak_memory_mib"] for r in steps)),
        "judge_start": evals[0]["eval_judge"],
        "judge_end": evals[-1]["eval_judge"],
        "judge_best": max(r["eval_judge"] for r in evals),
        "reward_start": evals[0]["eval_reward"],
        "reward_end": evals[-1]["eval_reward"],
    }


def plot_alignment(histories: dict[str, list[dict]], path: Path) -> Path:
    """Held-out judge vs training seconds and vs steps, and each run's own held-out reward: a reward
    that rises while the judge falls is reward hacking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_step, own) = plt.subplots(1, 3, figsize=(15, 4))
    for name, history in histories.items():
        evals = [r for r in history if "eval_judge" in r]
        style = dict(linestyle="-" if name.startswith("GRPO") else "--", marker="o", markersize=3, label=name)
        seconds = [r["train_seconds"] for r in evals]
        by_time.plot(seconds, [r["eval_judge"] for r in evals], **style)
        by_step.plot([r["step"] for r in evals], [r["eval_judge"] for r in evals], **style)
        own.plot(seconds, [r["eval_reward"] - evals[0]["eval_reward"] for r in evals], **style)
    by_time.set_xlabel("training seconds (sampling + reward + update)")
    by_step.set_xlabel("optimizer steps")
    own.set_xlabel("training seconds")
    by_time.set_ylabel("held-out judge score (fixed seeds, ODE)")
    by_step.set_ylabel("held-out judge score")
    own.set_ylabel("the run's own reward, change from the start")
    own.legend(fontsize=7)
    figure.suptitle("Aligning the toy generator: held-out judge and reward")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def alignment_table(summary: dict) -> str:
    config = summary["config"]
    lines = [
        f"# Toy-world alignment: {config['budget_s']:.0f} training seconds per run",
        "",
        "Held-out judge score (the toy world's judge on decoded ODE samples of "
        f"{config['num_eval_prompts']} held-out prompts, fixed seeds) before and after; reward cost per sample; peak memory.",
        "",
        "| run | steps | judge start | judge end | best | Δ judge | reward ms/sample | sampling s/step | update s/step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        lines.append(
            f"| {name} | {run['steps']} | {run['judge_start']:.3f} | {run['judge_end']:.3f} | {run['judge_best']:.3f} | "
            f"{run['judge_end'] - run['judge_start']:+.3f} | {run['reward_ms_per_sample']:.2f} | {run['sampling_s_per_step']:.2f} | "
            f"{run['update_s_per_step']:.2f} | {run['peak_memory_mib']:.0f} |"
        )
    lines += ["", "![judge vs time and steps](alignment.png)", ""]
    return "\n".join(lines)
