"""``AlignConfig``: every setting of ``dina-lrm align``, with the defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dina_lrm.align.rewards import RewardSpec
from dina_lrm.align.sampling import SDE_TYPES
from dina_lrm.config import from_dict

METHODS = ("grpo", "refl", "draft")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class AlignConfig:
    method: str = "grpo"  # grpo (Flow-GRPO / Flow-GRPO-Fast), refl (the paper's ReFL) or draft (DRaFT-K)
    generator: str = ""  # the policy's pipeline: local directory or hub id
    reward: RewardSpec = field(default_factory=RewardSpec)
    extra_rewards: list[RewardSpec] = field(default_factory=list)  # more rewards, e.g. a proxy beside DiNa-LRM
    reward_weights: list[float] = field(default_factory=lambda: [1.0])  # one per reward: reward, then extra_rewards
    judge: RewardSpec | None = None  # independent judge of the validation and test prompts
    prompts: str = ""  # training prompts: a text file, one per line
    eval_prompts: str = ""  # validation prompts (default: the training prompts); they pick the best checkpoint
    num_eval_prompts: int = 16
    test_prompts: str = ""  # test prompts, never used to pick: the base and the kept checkpoint are scored on them
    num_test_prompts: int = 64
    out: str = "align_out"
    seed: int = 0
    max_steps: int = 100
    prompts_per_step: int = 4  # per process
    group_size: int = 4  # samples per prompt (grpo)
    train_sampling_steps: int | None = None  # default: 40 for refl (the released recipe), 10 otherwise
    eval_sampling_steps: int = 20
    resolution: int | None = None  # image side in pixels (default: the transformer's native sample size)
    guidance_scale: float = 4.0
    # grpo
    sde_type: str = "sde"  # sde (Flow-GRPO) or cps (coefficients-preserving)
    noise_level: float = 0.7
    sde_window_size: int = 0  # > 0: noise (and training) only in a window of this many steps, drawn per step (Flow-GRPO-Fast)
    sde_window_range: list[int] | None = None  # [first, end) the window lies in; default: every step
    timestep_fraction: float = 0.5  # without a window: share of the sampled steps trained on
    global_std: bool = False  # normalise advantages by the batch's std instead of each group's
    same_initial_noise: bool = False  # a prompt's group starts from one initial noise (Flow-GRPO's same_latent)
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    updates_per_step: int = 2  # optimizer steps per batch of samples: later ones see ratios != 1
    # refl
    refl_stop_range: list[int] | None = None  # [first, end) of the stop index; default: the last quarter of the schedule
    pretrain_data: str = ""  # preference shards whose chosen latents feed the flow-matching "pretrain" loss
    pretrain_weight: float = 0.0  # lambda in (L_refl + lambda L_pt) / (1 + lambda)
    pretrain_batch_size: int = 4
    # draft
    draft_k: int = 1  # steps back-propagated through
    gradient_checkpointing: bool = True  # keep only each back-propagated step's input
    # all methods
    kl_coef: float = 0.0  # grpo: KL of the SDE means to the frozen generator's; refl/draft: L2 of the velocity to it
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    ema_decay: float = 0.0  # > 0: an EMA of the LoRA is what is evaluated and saved
    ema_every: int = 1  # optimizer steps between EMA updates
    eval_every: int = 10
    early_stop_patience: int = 0  # > 0: stop after this many evaluations without a better validation judge
    divergence_tolerance: float = 0.01  # judge drop below its best that, with a higher reward, counts as hacking
    checkpoint_every: int = 10
    max_sequence_length: int = 128  # T5 tokens of the policy's prompt embeddings (a DiNa-LRM reward uses its own)
    negative_prompt: str = ""
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, raw: dict) -> AlignConfig:
        config = from_dict(cls, raw)
        config.validate()
        return config

    @property
    def sampling_steps(self) -> int:
        if self.train_sampling_steps is not None:
            return self.train_sampling_steps
        return 40 if self.method == "refl" else 10

    @property
    def all_rewards(self) -> list[RewardSpec]:
        return [self.reward, *self.extra_rewards]

    @property
    def stop_window(self) -> tuple[int, int]:
        steps = self.sampling_steps
        first, end = self.refl_stop_range or (steps - steps // 4, steps)
        return first, end

    @property
    def noise_window(self) -> tuple[int, int]:
        first, end = self.sde_window_range or (0, self.sampling_steps)
        return first, end

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown alignment method {self.method!r}; choose one of {METHODS}")
        if not self.generator or not self.prompts:
            raise ValueError("align needs a generator and prompts")
        if self.sampling_steps < 1:
            raise ValueError(f"train_sampling_steps must be >= 1, got {self.sampling_steps}")
        if self.lora_rank < 1 or not self.lora_targets:
            raise ValueError("no trainable parameters: lora_rank must be >= 1 and lora_targets non-empty")
        if min(self.prompts_per_step, self.max_steps, self.updates_per_step, self.eval_every, self.checkpoint_every, self.ema_every) < 1:
            raise ValueError("prompts_per_step, max_steps, updates_per_step, eval_every, checkpoint_every and ema_every must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for spec in [*self.all_rewards, *([self.judge] if self.judge else [])]:
            spec.validate()
        if len(self.reward_weights) != len(self.all_rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.all_rewards)} rewards "
                             f"(reward + {len(self.extra_rewards)} extra_rewards): give one weight per reward")
        {"grpo": self._validate_grpo, "refl": self._validate_refl, "draft": self._validate_draft}[self.method]()

    def _validate_grpo(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"GRPO compares samples within a prompt's group: group_size must be >= 2, got {self.group_size}")
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"unknown sde_type {self.sde_type!r}; choose one of {SDE_TYPES}")
        if not 0 < self.timestep_fraction <= 1 or self.noise_level <= 0:
            raise ValueError("timestep_fraction must be in (0, 1] and noise_level > 0 for grpo")
        if self.sde_window_size < 0:
            raise ValueError(f"sde_window_size must be >= 0, got {self.sde_window_size}")
        first, end = self.noise_window
        if self.sde_window_size and not 0 <= first < first + self.sde_window_size <= end <= self.sampling_steps:
            raise ValueError(f"an SDE window of {self.sde_window_size} steps does not fit sde_window_range [{first}, {end}) "
                             f"within the {self.sampling_steps}-step schedule")

    def _validate_refl(self) -> None:
        first, end = self.stop_window
        if not 0 <= first < end <= self.sampling_steps:
            raise ValueError(f"refl_stop_range [{first}, {end}) lies outside the {self.sampling_steps}-step schedule "
                             f"(stop indices 0..{self.sampling_steps - 1})")
        if self.pretrain_weight < 0:
            raise ValueError(f"pretrain_weight must be >= 0, got {self.pretrain_weight}")
        if self.pretrain_weight > 0 and not self.pretrain_data:
            raise ValueError("pretrain_weight > 0 needs pretrain_data: a folder of preference shards with the latents to keep fitting")
        if self.pretrain_batch_size < 1:
            raise ValueError(f"pretrain_batch_size must be >= 1, got {self.pretrain_batch_size}")
        self._validate_gradient_rewards()

    def _validate_draft(self) -> None:
        if not 1 <= self.draft_k <= self.sampling_steps:
            raise ValueError(f"draft_k must be between 1 and train_sampling_steps ({self.sampling_steps})")
        self._validate_gradient_rewards()

    def _validate_gradient_rewards(self) -> None:
        if not any(self.reward_weights):
            raise ValueError(f"{self.method} needs at least one reward with a non-zero weight in reward_weights")
        for spec, weight in zip(self.all_rewards, self.reward_weights):
            if weight and spec.kind == "python" and not spec.differentiable:
                raise ValueError(f"{self.method} back-propagates through the reward, but {spec.name or spec.target} is not "
                                 "differentiable (set differentiable: true if it returns torch scores with a graph), or use grpo")


def read_prompts(source: str, count: int | None = None) -> list[str]:
    """Prompts from a text file (one per line), the first ``count`` of them."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:count] if count else prompts
