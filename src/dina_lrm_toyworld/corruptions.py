"""Controlled corruptions: a scene that breaks exactly one clause of its prompt, or an image
with one quality defect. They give the preference data its hard negatives."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dina_lrm_toyworld.scenes import COLOURS, OPPOSITE, SHAPES, PromptSpec, Scene, place_objects, with_object

SEMANTIC = ("colour", "count", "shape", "size", "relation")
DEFECTS = ("blur", "noise", "colour cast", "fragments")


def corrupt_scene(spec: PromptSpec, scene: Scene, kind: str, rng: np.random.Generator) -> Scene | None:
    """The scene with one clause of ``spec`` broken, or None when ``kind`` does not apply to it."""
    index = int(rng.integers(len(scene.objects)))
    target = scene.objects[index]
    if kind == "colour":
        used = {g.colour for g in spec.groups}
        return with_object(scene, index, colour=str(rng.choice([c for c in COLOURS if c not in used])))
    if kind == "shape":
        return with_object(scene, index, shape=str(rng.choice([s for s in SHAPES if s != target.shape])))
    objects = [(o.colour, o.shape, o.size) for o in scene.objects]
    if kind == "size":
        mentioned = [i for i, o in enumerate(scene.objects) if any(g.size and g.colour == o.colour for g in spec.groups)]
        if not mentioned:
            return None
        index = mentioned[0]
        objects[index] = (*objects[index][:2], "small" if objects[index][2] == "large" else "large")
        return place_objects(objects, rng, spec.relation)
    if kind == "count":
        if spec.relation is not None:
            return None
        new_count = int(rng.choice([c for c in (1, 2, 3, 4) if c != spec.groups[0].count]))
        return place_objects([objects[0]] * new_count, rng)
    if kind == "relation":
        if spec.relation is None:
            return None
        return place_objects(objects, rng, OPPOSITE[spec.relation])
    raise ValueError(f"unknown corruption {kind!r}; known: {SEMANTIC}")


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with one quality defect; ``strength`` scales it."""
    pixels = image.astype(np.float32)
    if kind == "blur":
        pixels = ndimage.gaussian_filter(pixels, sigma=(1.5 * strength, 1.5 * strength, 0))
    elif kind == "noise":
        pixels = pixels + rng.normal(0.0, 20.0 * strength, pixels.shape)
    elif kind == "colour cast":
        direction = rng.normal(size=3)
        pixels = pixels + 45.0 * strength * direction / np.linalg.norm(direction)
    elif kind == "fragments":
        palette = list(COLOURS.values())
        for _ in range(int(rng.integers(4, 8))):
            side = int(rng.integers(2, 4))
            y, x = rng.integers(0, image.shape[0] - side, size=2)
            pixels[y : y + side, x : x + side] = palette[rng.integers(len(palette))]
    else:
        raise ValueError(f"unknown defect {kind!r}; known: {DEFECTS}")
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
