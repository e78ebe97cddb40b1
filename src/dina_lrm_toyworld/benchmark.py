"""A ranked benchmark from the toy world, in the HPDv2 layout, for ``dina-lrm eval`` on a CPU.

Per prompt: a clean render and corrupted renders of it (wrong count, colour, shape, position, or an
image defect), ranked by the judge. Judge scores are rounded to 0.01 first, so near-equal images
tie, as they do in human rankings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dina_lrm_toyworld.corruptions import corrupt_scene
from dina_lrm_toyworld.judge import Judge
from dina_lrm_toyworld.preferences import corrupted_render
from dina_lrm_toyworld.scenes import parse_prompt, render, sample_prompts, scene_for


def competition_ranks(scores: list[float]) -> list[int]:
    """1 for the best; equal scores share a rank (1, 2, 2, 4)."""
    return [1 + sum(other > score for other in scores) for score in scores]


def write_toy_benchmark(out: str | Path, prompts: int = 40, images_per_prompt: int = 4, seed: int = 0) -> Path:
    """Write ``OUT/test.json`` (``[{prompt, image_path, rank}]``) and ``OUT/images/*.png``; returns the JSON path."""
    if prompts < 1 or images_per_prompt < 2:
        raise ValueError("a benchmark needs at least one prompt and two images per prompt")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, judge, rows = np.random.default_rng(seed), Judge(), []
    for number, spec in enumerate(sample_prompts(prompts, "test", seed)):
        scene = scene_for(spec, rng)
        images = [render(scene)] + [corrupted_render(spec, scene, rng)[0] for _ in range(images_per_prompt - 1)]
        paths = []
        for k, image in enumerate(images):
            paths.append(f"images/{number:04d}_{k}.png")
            Image.fromarray(image).save(out / paths[-1])
        scores = [round(judge(image, spec).score, 2) for image in images]
        rows.append({"prompt": spec.text, "image_path": paths, "rank": competition_ranks(scores)})
    path = out / "test.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_examples(out: str | Path, prompt: str = "two red circles", kind: str = "colour", seed: int = 0) -> list[Path]:
    """Two images for trying a toy reward model: a clean render of ``prompt`` and the scene with one
    clause broken (``kind``; the shipped ``toyworld/examples/``: ``write_examples("src/dina_lrm_toyworld/examples")``)."""
    spec, rng = parse_prompt(prompt), np.random.default_rng(seed)
    scene = scene_for(spec, rng)
    wrong = next(w for w in (corrupt_scene(spec, scene, kind, rng) for _ in range(100)) if w is not None)  # placement can fail
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = prompt.replace(" ", "_")
    paths = [out / f"{stem}.png", out / f"{stem}_wrong_{kind}.png"]
    for path, image in zip(paths, (render(scene), render(wrong))):
        Image.fromarray(image).save(path)
    return paths
