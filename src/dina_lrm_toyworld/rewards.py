"""The toy world's rewards as Flow-GRPO style factories, so ``dina-lrm align`` takes them the way it
takes any user's image reward (``kind: python``):

* ``dina_lrm_toyworld.rewards:judge``: the judge, with per-sample clause results in its info;
* ``dina_lrm_toyworld.rewards:pixel_reward`` with ``kwargs: {path: ..., generator: ...}``: the saved
  pixel reward model (differentiable: its scores keep the graph back to the images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dina_lrm import SD3PromptEncoder, load_pipeline
from dina_lrm_toyworld.generator import T5_TOKENS
from dina_lrm_toyworld.judge import Judge, JudgeResult
from dina_lrm_toyworld.pixel_reward import PixelReward
from dina_lrm_toyworld.scenes import parse_prompt

JUDGE = Judge()
CLAUSES = ("object", "colour", "count", "size", "relation", "no_extra", "quality")


def judge_results(images: torch.Tensor, prompts: list[str]) -> list[JudgeResult]:
    """The judge on (N, 3, H, W) images in [0, 1]."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return JUDGE.batch(list(pixels), prompts)


def judge_scores(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return torch.tensor([result.score for result in judge_results(images, prompts)], dtype=torch.float32)


def clause_rates(result: JudgeResult, prompt: str) -> dict[str, float]:
    """Per clause kind, the share of the prompt's clauses of that kind the image satisfies (NaN where
    the prompt has none): object = right shape, colour = an object of each asked colour is there,
    count, size, relation, no_extra = no object of another colour; and the image's quality."""
    spec = parse_prompt(prompt)
    found_colours = {o.colour for o in result.objects}
    kinds: dict[str, list[bool]] = {kind: [] for kind in CLAUSES[:-1]}
    kinds["colour"] = [group.colour in found_colours for group in spec.groups]
    for clause, holds in result.clauses.items():
        kind = {"shape": "object", "count": "count", "size": "size"}.get(clause.rsplit(" ", 1)[-1])
        kinds[kind or ("relation" if clause == "relation" else "no_extra")].append(holds)
    rates = {kind: float(np.mean(values)) if values else float("nan") for kind, values in kinds.items()}
    return {**rates, "quality": result.quality}


def judge(device):
    """``factory(device)`` for the judge: ``fn(images, prompts, metadata) -> (scores, info)``; info holds
    ``alignment`` and the clause rates of :func:`clause_rates`, one number per sample."""

    def fn(images, prompts, metadata=None):
        results = judge_results(images, list(prompts))
        rates = [clause_rates(result, prompt) for result, prompt in zip(results, prompts)]
        info = {kind: np.array([r[kind] for r in rates]) for kind in CLAUSES}
        info["alignment"] = np.array([result.alignment for result in results])
        return np.array([result.score for result in results], dtype=np.float32), info

    fn.inputs = "images"
    return fn


def constant(device):
    """``factory(device)`` for a reward that scores every image 1/2: every advantage is zero, so DiffusionNFT's
    optimality probability is 1/2 everywhere (the biased base's gate: such a run must leave it unchanged)."""

    def fn(images, prompts, metadata=None):
        return np.full(len(images), 0.5, dtype=np.float32), {}

    return fn


def pixel_reward(path: str | Path, generator: str | Path):
    """``factory(device)`` for the pixel reward saved at ``path``, reading prompts with ``generator``'s
    text encoders; its scores are differentiable torch tensors."""

    def factory(device):
        model = load_pixel_reward(path).to(device)
        encoder = SD3PromptEncoder.from_pipeline(load_pipeline(generator).to(device), max_sequence_length=T5_TOKENS)

        def fn(images, prompts, metadata=None):
            states, pooled = encoder(list(prompts))
            return model(images * 2 - 1, states, pooled), {}

        fn.inputs = "images"
        return fn

    return factory


def save_pixel_reward(model: PixelReward, path: str | Path) -> Path:
    path = Path(path)
    widths = {"text_width": str(model.text_proj.in_features), "pooled_width": str(model.stages[0].film.in_features)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=widths)
    return path


def load_pixel_reward(path: str | Path) -> PixelReward:
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
