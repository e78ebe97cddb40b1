"""``dina-lrm eval``'s settings: each field's help is the CLI flag's (no torch import here, so ``--help``
stays instant)."""

from __future__ import annotations

from dataclasses import dataclass

from dina_lrm.config import DTYPE_NAMES, from_dict, parse_levels, setting

PROTOCOLS = ("both", "ours", "official")


@dataclass
class EvalConfig:
    format: str = setting("", "hpdv2, imagereward, hpdv3, genai_bench, pickapic or generic (see docs/eval.md)")
    input: str = setting("", "the benchmark's annotation file or parquet directory")
    split: str | None = setting(None, "one split of a parquet dataset folder: test_unique (Pick-a-Pic, what PickScore "
                                      "reports), test_v1 (GenAI-Bench v1)")
    min_confidence: float | None = setting(None, "HPDv3: keep rows with confidence >= this (HPSv3's 7B config: 0.95)")
    min_vote_share: float | None = setting(None, "HPDv3: keep rows whose chosen image's vote share is above this "
                                                 "(the authors' data tool: 0.6)")
    protocol: str = setting("both", "accuracy columns: ours (one rule for every benchmark), official (the benchmark's own "
                                    "metric: HPSv2 inversion, ImageReward, PickScore, GenAI-Bench 4-way) or both", choices=PROTOCOLS)
    tie_threshold: float = setting(0.0, "official Pick-a-Pic / GenAI-Bench metric: predict a tie when |P(a) - P(b)| <= this "
                                        "(PickScore picks it on validation_unique)")
    out: str = setting("eval_out", "report directory")
    reward: str | None = setting(None, "DiNa-LRM reward model directory")
    model: str | None = setting(None, "the reward model's generator pipeline: local directory or hub id")
    images_root: str | None = setting(None, "where relative image paths start (default: the annotation file's folder)")
    latent_cache: str | None = setting(None, "where encoded latents are kept between runs (default: OUT/latents)")
    u_values: list[float] = setting(help="noise levels scored one by one", factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                                    flags=("--u",))
    draws: list[int] = setting(help="noise-draw ensembles at the best u", factory=lambda: [2, 4, 8])
    level_sets: list[list[float]] = setting(help="multi-level ensembles", factory=lambda: [[0.2, 0.6], [0.2, 0.4, 0.6], [0.2, 0.4, 0.6, 0.8]],
                                            flags=("--levels",), parse=parse_levels, metavar="U1,U2,...")
    extra_rewards: list[str] = setting(help="another reward model for the table: a dina_lrm.rewards.Reward (or a factory of one) in a module "
                                            "or .py file, MODULE:ATTR; repeat the flag for several", factory=list,
                                       flags=("--extra-reward",), metavar="MODULE:ATTR", append=True)
    batch_size: int = setting(32, "images per scoring call (whole prompt groups)")
    seed: int = setting(0, "noise and bootstrap seed")
    bootstrap_resamples: int = setting(1000, "bootstrap resamples of the intervals", flags=("--resamples",))
    calibration_bins: int = setting(5, "bins of the calibration table and plot")
    skip_missing: bool = setting(False, "evaluate without missing or unreadable images")
    allow_outside_root: bool = setting(False, "read image paths that lead outside the images root (absolute, ../)")
    device: str | None = setting(None, "default: this process's accelerator (or cpu)")
    dtype: str = setting("float32", "precision of the generator and reward model", choices=DTYPE_NAMES)
    max_sequence_length: int | None = setting(None, "T5 tokens (default: the number the reward model was trained with)")
    reference_size: int | None = setting(None, "encode at buckets of about SIZE^2 pixels (default: the generator's native size)")
    groups_per_shard: int = setting(256, "prompt groups per latent-cache shard")

    @classmethod
    def from_dict(cls, raw: dict) -> EvalConfig:
        return from_dict(cls, raw)

    def validate(self) -> None:
        from dina_lrm.rewards import Setting

        if not self.format or not self.input:
            raise ValueError("eval needs a benchmark: format and input")
        if self.reward and not self.model:
            raise ValueError("a DiNa-LRM reward model needs its generator pipeline: pass --model")
        if self.batch_size < 1 or self.bootstrap_resamples < 1:
            raise ValueError("batch_size and bootstrap_resamples must be >= 1")
        for u in self.u_values:
            Setting((u,))
        for levels in self.level_sets:
            Setting(tuple(levels))
        if any(d < 2 for d in self.draws):
            raise ValueError(f"draw ensembles need >= 2 draws, got {self.draws}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if not 0 <= self.tie_threshold <= 1:
            raise ValueError(f"tie_threshold must lie in [0, 1], got {self.tie_threshold}")
