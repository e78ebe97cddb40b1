"""The toy world's domain: prompts from templates, scenes that satisfy them, and a renderer.

A prompt asks for one object ("a large red circle"), several of one kind ("three blue squares")
or two objects in a spatial relation ("a green triangle above a yellow square"). Objects in one
prompt have distinct colours unless they are copies of one kind, so the judge can find each
object by its colour. Some colour-shape combinations never occur in training prompts
(``HELD_OUT_COMBINATIONS``): prompts that use one are the test split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (215, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 70, 215),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7.5, "large": 12.0}  # half-width in pixels
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# the colours a biased generator mixes up, in pairs (toyworld.pretrain's confusion_rate)
CONFUSIONS = {"red": "purple", "purple": "red", "blue": "cyan", "cyan": "blue", "green": "yellow", "yellow": "green"}
HELD_OUT_COMBINATIONS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("purple", "triangle")})
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one colour and shape; ``size`` is None when the prompt does not say."""

    colour: str
    shape: str
    count: int = 1
    size: str | None = None

    def text(self) -> str:
        size = f"{self.size} " if self.size else ""
        plural = "s" if self.count > 1 else ""
        return f"{COUNT_WORDS[self.count]} {size}{self.colour} {self.shape}{plural}"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: one object group, or two single objects and a relation between them."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return self.groups[0].text()
        relation = "to the left of" if self.relation == "left of" else "to the right of" if self.relation == "right of" else self.relation
        return f"{self.groups[0].text()} {relation} {self.groups[1].text()}"

    @property
    def split(self) -> str:
        held_out = any((g.colour, g.shape) in HELD_OUT_COMBINATIONS for g in self.groups)
        return "test" if held_out else "train"


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    x: float  # centre, pixels
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


_GROUP = r"(a|two|three) (?:(small|large) )?(\w+) (circle|square|triangle)s?"
_PROMPT = re.compile(rf"^{_GROUP}(?: (to the left of|to the right of|above|below) {_GROUP})?$")


def parse_prompt(text: str) -> PromptSpec:
    """The inverse of ``PromptSpec.text``; raises ValueError for text outside the templates."""
    match = _PROMPT.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a toy-world prompt: {text!r}")
    words = {v: k for k, v in COUNT_WORDS.items()}
    groups = []
    for first in (1, 6):
        count, size, colour, shape = match.group(first, first + 1, first + 2, first + 3)
        if count is None:
            continue
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r} in {text!r}; known: {sorted(COLOURS)}")
        groups.append(ObjectGroup(colour, shape, words[count], size))
    relation = match.group(5)
    if relation is not None:
        relation = relation.removeprefix("to the ")
    return PromptSpec(tuple(groups), relation)


def _random_group(rng: np.random.Generator, split: str, exclude_colour: str | None = None, count: int = 1) -> ObjectGroup:
    while True:
        colour = str(rng.choice([c for c in COLOURS if c != exclude_colour]))
        shape = str(rng.choice(SHAPES))
        size = [None, "small", "large"][rng.integers(3)] if count == 1 else None
        group = ObjectGroup(colour, shape, count, size)
        if split == "test" or (colour, shape) not in HELD_OUT_COMBINATIONS:
            return group


def sample_prompt(rng: np.random.Generator, split: str = "train") -> PromptSpec:
    """A random prompt of the split: 30% single objects, 30% counts, 40% relations."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        kind = rng.random()
        if kind < 0.3:
            spec = PromptSpec((_random_group(rng, split),))
        elif kind < 0.6:
            spec = PromptSpec((_random_group(rng, split, count=int(rng.integers(2, 4))),))
        else:
            first = _random_group(rng, split)
            second = _random_group(rng, split, exclude_colour=first.colour)
            spec = PromptSpec((first, second), str(rng.choice(RELATIONS)))
        if spec.split == split:
            return spec


def sample_prompts(count: int, split: str, seed: int) -> list[PromptSpec]:
    """``count`` distinct prompts of a split (fewer if the split has fewer)."""
    rng = np.random.default_rng(seed)
    prompts: dict[str, PromptSpec] = {}
    for _ in range(50 * count):
        spec = sample_prompt(rng, split)
        prompts.setdefault(spec.text, spec)
        if len(prompts) == count:
            break
    return list(prompts.values())


def confused(spec: PromptSpec, rate: float, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with each object group's colour swapped for its ``CONFUSIONS`` partner with probability ``rate``."""
    groups = tuple(replace(g, colour=CONFUSIONS[g.colour]) if rng.random() < rate else g for g in spec.groups)
    return PromptSpec(groups, spec.relation)


def _relation_holds(relation: str, first: SceneObject, second: SceneObject, margin: float = 4.0) -> bool:
    dx, dy = second.x - first.x, second.y - first.y
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[relation]


def place_objects(
    objects: list[tuple[str, str, str]], rng: np.random.Generator, relation: str | None = None, size: int = IMAGE_SIZE
) -> Scene | None:
    """Objects (colour, shape, size) at random non-overlapping positions; with ``relation``, the
    first object stands in that relation to the second. None when no placement was found."""
    placed: list[SceneObject] = []
    for colour, shape, size_name in objects:
        half = SIZES[size_name]
        for _ in range(100):
            x, y = rng.uniform(half + 2, size - half - 2, size=2)
            candidate = SceneObject(colour, shape, size_name, float(x), float(y))
            clear = all(
                max(abs(o.x - x), abs(o.y - y)) > SIZES[o.size] + half + 3 for o in placed
            )
            if clear and (relation is None or not placed or _relation_holds(relation, placed[0], candidate, 8.0)):
                placed.append(candidate)
                break
        else:
            return None
    return Scene(tuple(placed))


def scene_for(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A random scene that satisfies every clause of ``spec`` (sizes drawn where the prompt is silent)."""
    objects = []
    for group in spec.groups:
        for _ in range(group.count):
            objects.append((group.colour, group.shape, group.size or str(rng.choice(list(SIZES)))))
    for _ in range(100):
        scene = place_objects(objects, rng, spec.relation, size)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place the objects of {spec.text!r} without overlap")


def _triangle(x: float, y: float, half: float) -> list[tuple[float, float]]:
    return [(x, y - half), (x + half, y + half), (x - half, y + half)]


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 RGB, drawn with 4x supersampling for smooth edges."""
    scale = 4
    image = Image.new("RGB", (size * scale, size * scale), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y, half, fill = obj.x * scale, obj.y * scale, SIZES[obj.size] * scale, COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
        else:
            draw.polygon(_triangle(x, y, half), fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def with_object(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return Scene(tuple(objects))
