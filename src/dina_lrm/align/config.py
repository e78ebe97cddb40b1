"""``AlignConfig``: every setting of ``dina-lrm align``, with the defaults in one place. The shared loop's
settings are top-level keys; each method's own live in its section (``refl``, ``grpo``, ``nft``,
``draft``), defined beside the method in ``align/methods/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dina_lrm.align.methods import METHODS
from dina_lrm.align.methods.draft import DraftConfig
from dina_lrm.align.methods.grpo import GRPOConfig
from dina_lrm.align.methods.nft import NFTConfig
from dina_lrm.align.methods.refl import ReFLConfig
from dina_lrm.align.methods.sft import SFTConfig
from dina_lrm.align.reward_spec import RewardSpec
from dina_lrm.config import from_dict


@dataclass
class AlignConfig:
    method: str = "grpo"  # grpo (Flow-GRPO / -Fast), refl (the paper's ReFL), nft (DiffusionNFT), draft (DRaFT-K) or sft (fine-tuning on latents)
    generator: str = ""  # the policy's pipeline: local directory or hub id (SD3 / SD3.5, FLUX.1, Z-Image, Qwen-Image)
    reward: RewardSpec = field(default_factory=RewardSpec)
    extra_rewards: list[RewardSpec] = field(default_factory=list)  # more rewards, e.g. a proxy beside DiNa-LRM (each with its weight)
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
    train_sampling_steps: int | None = None  # default: the method's (40 for refl, the released recipe; 10 otherwise)
    eval_sampling_steps: int = 20
    resolution: int | None = None  # image side in pixels (default: the transformer's native sample size)
    guidance_scale: float | None = None  # of the training rollouts; default: none for nft (CFG-free), the pipeline's own otherwise
    eval_guidance_scale: float | None = None  # of the evaluations; default: guidance_scale
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None  # default: the generator family's recipe list (SD3: both streams' attention, not attn2)
    ema_decay: float | None = None  # > 0: an EMA of the LoRA is what is evaluated and saved; default: 0.9 for nft, off otherwise
    ema_every: int = 1  # optimizer steps between EMA updates
    eval_every: int = 10
    early_stop_patience: int = 0  # > 0: stop after this many evaluations without a better validation judge
    divergence_tolerance: float = 0.01  # judge drop below its best that, with a higher reward, counts as hacking
    checkpoint_every: int = 10
    max_sequence_length: int | None = None  # text tokens of the policy's prompt embeddings (default: its encoder's); a DiNa-LRM reward uses its own
    negative_prompt: str = ""
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, raw: dict) -> AlignConfig:
        config = from_dict(cls, raw)
        config.validate()
        return config

    @property
    def method_config(self):
        """The selected method's section."""
        return getattr(self, self.method)

    @property
    def sampling_steps(self) -> int:
        return self.train_sampling_steps if self.train_sampling_steps is not None else self.method_config.sampling_steps

    @property
    def ema(self) -> float:
        return self.ema_decay if self.ema_decay is not None else self.method_config.ema_decay

    @property
    def all_rewards(self) -> list[RewardSpec]:
        return [self.reward, *self.extra_rewards]

    @property
    def reward_weights(self) -> list[float]:
        return [spec.weight for spec in self.all_rewards]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown alignment method {self.method!r}; choose one of {tuple(METHODS)}")
        if not self.generator or not self.prompts:
            raise ValueError("align needs a generator and prompts")
        if self.sampling_steps < 1 or self.eval_sampling_steps < 1:
            raise ValueError(f"train_sampling_steps and eval_sampling_steps must be >= 1, got {self.sampling_steps} and {self.eval_sampling_steps}")
        if self.lora_rank < 1 or self.lora_targets == []:
            raise ValueError("no trainable parameters: lora_rank must be >= 1 and lora_targets non-empty")
        if min(self.prompts_per_step, self.max_steps, self.eval_every, self.checkpoint_every, self.ema_every) < 1:
            raise ValueError("prompts_per_step, max_steps, eval_every, checkpoint_every and ema_every must be >= 1")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema}")
        for spec in [*self.all_rewards, *([self.judge] if self.judge else [])]:
            spec.validate()
        self.method_config.validate(self.sampling_steps)
        if self.method in ("refl", "draft"):
            self._validate_gradient_rewards()

    def _validate_gradient_rewards(self) -> None:
        if not any(self.reward_weights):
            raise ValueError(f"{self.method} needs at least one reward with a non-zero weight")
        for spec in self.all_rewards:
            if spec.weight and spec.kind == "python" and not spec.differentiable:
                raise ValueError(f"{self.method} back-propagates through the reward, but {spec.name or spec.target} is not "
                                 "differentiable (set differentiable: true if it returns torch scores with a graph), or use grpo or nft")


def read_prompts(source: str, count: int | None = None) -> list[str]:
    """Prompts from a text file (one per line), the first ``count`` of them."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:count] if count else prompts
