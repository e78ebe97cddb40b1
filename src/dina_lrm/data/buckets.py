"""Aspect-ratio buckets around a backbone's native resolution.

Every bucket holds about ``reference_size ** 2`` pixels, with both sides multiples of ``multiple``
(the VAE downsampling factor times the patch size, so every bucket is a valid latent size). A group
of images goes to the bucket nearest its mean log aspect ratio; each image is resized to cover the
bucket and centre-cropped, so images of one group, and pairs of one batch, share one latent shape.
"""

from __future__ import annotations

import math

from PIL import Image

MAX_ASPECT_RATIO = 4.0


def aspect_ratio_buckets(reference_size: int, multiple: int, step: int | None = None) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``reference_size**2`` pixels, heights every ``step`` pixels
    (default ``4 * multiple``), aspect ratios within 1:4 .. 4:1; always includes the square one."""
    if reference_size < multiple or reference_size % multiple:
        raise ValueError(f"reference size {reference_size} must be a positive multiple of {multiple}")
    step = step or 4 * multiple
    if step % multiple:
        raise ValueError(f"bucket step {step} must be a multiple of {multiple}")
    area = reference_size**2
    buckets = {(reference_size, reference_size)}
    for height in range(step, 2 * reference_size + 1, step):
        width = max(multiple, round(area / height / multiple) * multiple)
        if 1 / MAX_ASPECT_RATIO <= width / height <= MAX_ASPECT_RATIO:
            buckets |= {(height, width), (width, height)}
    return sorted(buckets)


def nearest_bucket(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the mean log aspect ratio of (height, width) ``sizes``."""
    target = sum(math.log(w / h) for h, w in sizes) / len(sizes)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), b))


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``bucket`` (height, width), keeping its aspect ratio, then centre-crop."""
    height, width = bucket
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
