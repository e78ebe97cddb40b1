"""A deterministic GenEval-style judge for toy-world images, rendered or generated.

It white-balances the image against the known background, labels each pixel with the nearest
palette colour, finds objects as connected components per colour, classifies each object's shape
from how its area sits in its bounding box and its size from the box, then checks the prompt's clauses. Quality is scored separately from four
defect detectors (blur, noise, colour cast, fragments), each a severity in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dina_lrm_toyworld.scenes import BACKGROUND, COLOURS, SIZES, PromptSpec, parse_prompt

PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
COLOUR_NAMES = list(COLOURS)
MAX_COLOUR_DISTANCE = 70.0  # farther than this from every palette entry: an edge or a defect pixel
MIN_OBJECT_AREA = 24  # pixels; smaller same-colour blobs are fragments
MIN_FRAGMENT_AREA = 3
SIZE_THRESHOLD = sum(2 * h for h in SIZES.values()) / 2  # bounding-box side between small and large
RELATION_MARGIN = 2.0
ALIGNMENT_WEIGHT = 2.0  # score = (2 * alignment + quality) / 3


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    size: str
    x: float
    y: float
    area: int


@dataclass
class JudgeResult:
    clauses: dict[str, bool]
    defects: dict[str, float]  # severity in [0, 1] per defect
    objects: list[FoundObject] = field(default_factory=list)

    @property
    def alignment(self) -> float:
        """Fraction of the prompt's clauses the image satisfies."""
        return sum(self.clauses.values()) / len(self.clauses)

    @property
    def quality(self) -> float:
        return float(np.prod([1.0 - s for s in self.defects.values()]))

    @property
    def score(self) -> float:
        return (ALIGNMENT_WEIGHT * self.alignment + self.quality) / (ALIGNMENT_WEIGHT + 1)


def _as_array(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    return array.astype(np.float32)


def _background_offset(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0) - PALETTE[0]


def _label_pixels(pixels: np.ndarray) -> np.ndarray:
    """Per pixel: 0 background, 1..6 a palette colour, -1 none within MAX_COLOUR_DISTANCE."""
    distance = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Triangles (drawn point up) hold most of their area in the lower half of their box; squares
    fill their box, circles fill about pi/4 of it."""
    rows, cols = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    middle = rows.min() + (height - 1) / 2
    top_heaviness = ((rows > middle).sum() - (rows < middle).sum()) / len(rows)
    fill = len(rows) / (height * width)
    shape = "triangle" if top_heaviness > 0.25 else "square" if fill > 0.88 else "circle"
    return shape, float(np.sqrt(height * width))


def find_objects(labels: np.ndarray) -> tuple[list[FoundObject], int]:
    """Objects (components of at least MIN_OBJECT_AREA pixels) and the number of fragments."""
    objects, fragments = [], 0
    for index, colour in enumerate(COLOUR_NAMES, start=1):
        components, count = ndimage.label(labels == index)
        for component in range(1, count + 1):
            mask = components == component
            area = int(mask.sum())
            if area < MIN_OBJECT_AREA:
                fragments += area >= MIN_FRAGMENT_AREA
                continue
            shape, side = _classify_shape(mask)
            y, x = ndimage.center_of_mass(mask)
            size = "large" if side > SIZE_THRESHOLD else "small"
            objects.append(FoundObject(colour, shape, size, float(x), float(y), area))
    return objects, fragments


def _relation_holds(relation: str, first: FoundObject, second: FoundObject) -> bool:
    dx, dy = second.x - first.x, second.y - first.y
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > RELATION_MARGIN


def check_clauses(spec: PromptSpec, objects: list[FoundObject]) -> dict[str, bool]:
    clauses = {}
    for group in spec.groups:
        found = [o for o in objects if o.colour == group.colour]
        clauses[f"{group.colour} count"] = len(found) == group.count
        clauses[f"{group.colour} shape"] = bool(found) and all(o.shape == group.shape for o in found)
        if group.size:
            clauses[f"{group.colour} size"] = bool(found) and all(o.size == group.size for o in found)
    wanted = {g.colour for g in spec.groups}
    clauses["no other objects"] = all(o.colour in wanted for o in objects)
    if spec.relation:
        first, second = ([o for o in objects if o.colour == g.colour] for g in spec.groups)
        clauses["relation"] = bool(first and second) and _relation_holds(
            spec.relation, max(first, key=lambda o: o.area), max(second, key=lambda o: o.area)
        )
    return clauses


def edge_sharpness(pixels: np.ndarray) -> float:
    """Gradient-energy-weighted mean gradient over strong edges: high when edges are steps, low
    when they are ramps. A 5x5 median first keeps pixel noise from reading as edges."""
    smoothed = ndimage.median_filter(pixels, size=(5, 5, 1))
    gradients = np.concatenate([np.linalg.norm(np.diff(smoothed, axis=axis), axis=-1).ravel() for axis in (0, 1)])
    gradients = gradients[gradients > 30]
    return float((gradients**2).sum() / max(gradients.sum(), 1e-6))


def measure_defects(raw: np.ndarray, balanced: np.ndarray, fragments: int) -> dict[str, float]:
    """Severities in [0, 1]: 0 on a clean render, near 1 on the default-strength injected defect."""
    noise = np.median(np.abs(np.diff(raw, axis=1)))
    cast = np.linalg.norm(_background_offset(raw))
    return {
        "blur": float(np.clip((95.0 - edge_sharpness(balanced)) / 45.0, 0, 1)),
        "noise": float(np.clip((noise - 1.5) / 6.0, 0, 1)),
        "colour cast": float(np.clip((cast - 10.0) / 30.0, 0, 1)),
        "fragments": float(np.clip(fragments / 4.0, 0, 1)),
    }


class Judge:
    """``Judge()(image, prompt) -> JudgeResult``; ``prompt`` is text or a ``PromptSpec``."""

    def __call__(self, image, prompt: str | PromptSpec) -> JudgeResult:
        spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        raw = _as_array(image)
        balanced = np.clip(raw - _background_offset(raw), 0, 255)
        smoothed = ndimage.median_filter(balanced, size=(3, 3, 1))
        labels = _label_pixels(smoothed)
        objects, _ = find_objects(labels)
        _, fragments = find_objects(_label_pixels(balanced))
        defects = measure_defects(raw, balanced, fragments)
        return JudgeResult(check_clauses(spec, objects), defects, objects)

    def batch(self, images, prompts) -> list[JudgeResult]:
        return [self(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
