"""``dina-lrm prepare``'s settings: each field's help is the CLI flag's (no torch or pyarrow import here,
so ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass

from dina_lrm.config import DTYPE_NAMES, setting

DEFAULT_GROUPS_PER_UNIT = 512  # prompt groups per work unit (one shard): the unit of resume and of the rank split


@dataclass
class PrepareConfig:
    format: str = setting("", "pickapic, hpdv3, imagereward or generic (see docs/data.md)")
    input: str = setting("", "dataset file or directory (see docs/data.md)")
    out: str = setting("", "shard directory to write (rerun with the same settings to resume)")
    model: str = setting("", "generator pipeline (local directory or hub id) whose VAE encodes the images, and whose text "
                             "encoders cache embeddings")
    images_root: str | None = setting(None, "where relative image paths start (default: the dataset file's folder)")
    split: str | None = setting(None, "one split of a parquet dataset folder, e.g. train or validation_unique (Pick-a-Pic)")
    soft_labels: bool = setting(True, "HPDv3: HPSv3's soft label from choice_dist as the target; --hard-labels: target 1 for path1",
                                flags=("--hard-labels",))
    min_confidence: float | None = setting(None, "HPDv3: keep rows with confidence >= this (HPSv3's 7B config: 0.95)")
    min_vote_share: float | None = setting(None, "HPDv3: keep rows whose chosen image's vote share is above this "
                                                 "(the authors' data tool: 0.6)")
    reference_size: int | None = setting(None, "bucket area = SIZE^2 pixels (default: the generator's native size)")
    bucket_step: int | None = setting(None, "bucket side step in pixels (default: 4 x VAE factor x patch size)")
    batch_size: int = setting(16, "images per VAE call")
    groups_per_shard: int = setting(DEFAULT_GROUPS_PER_UNIT, "prompt groups per shard: the unit of resume and of the rank split")
    cache_prompt_embeds: bool = setting(False, "store text embeddings so training skips the text encoders")
    max_sequence_length: int = setting(128, "T5 tokens when caching embeddings")
    dtype: str = setting("float32", "VAE precision", choices=DTYPE_NAMES)

    def validate(self) -> None:
        missing = [f"--{name.replace('_', '-')}" for name in ("format", "input", "out", "model") if not getattr(self, name)]
        if missing:
            raise ValueError(f"prepare needs {', '.join(missing)}")
        if self.batch_size < 1 or self.groups_per_shard < 1:
            raise ValueError("batch_size and groups_per_shard must be >= 1")
