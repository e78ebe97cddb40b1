"""``dina-lrm align``: preference optimisation of a rectified-flow generator's LoRA against a reward.

Two methods, one loop (accelerate: each process samples its own prompts, gradients are averaged):

* ``grpo`` (Flow-GRPO): G SDE samples per prompt, rewards normalised within each prompt's group into
  advantages, PPO-style clipped ratio objective over a fraction of the sampled steps, optional KL to
  the frozen generator (the LoRA switched off), split into ``updates_per_step`` optimizer steps.
* ``draft`` (DRaFT-K): ODE samples whose last K steps keep the graph (gradient-checkpointed); the
  loss is minus the differentiable reward of the clean latent.

Every ``eval_every`` steps, held-out prompts are sampled with fixed seeds and scored by the reward and
by an independent judge, so reward hacking shows as the reward rising while the judge does not.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dina_lrm.align.grpo import clipped_policy_loss, group_advantages
from dina_lrm.align.rewards import RewardSpec, build_reward
from dina_lrm.align.sampling import Schedule, TextConditioning, predict_velocity, sample_ode, sample_sde
from dina_lrm.align.sde import gaussian_kl
from dina_lrm.config import from_dict
from dina_lrm.data.images import vae_decode
from dina_lrm.distributed import cpu_only
from dina_lrm.eval.cost import MemoryMeter
from dina_lrm.models.sd3_text import SD3PromptEncoder
from dina_lrm.scorer import DTYPES, load_pipeline, vae_scale_factor

METHODS = ("grpo", "draft")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class AlignConfig:
    method: str = "grpo"  # grpo or draft
    generator: str = ""  # the policy's pipeline: local directory or hub id
    reward: RewardSpec = field(default_factory=RewardSpec)
    judge: RewardSpec | None = None  # independent judge for evaluation (None: the reward only)
    prompts: str = ""  # a text file with one prompt per line, or toyworld:train
    eval_prompts: str = ""  # a text file, or toyworld:test
    num_eval_prompts: int = 16
    out: str = "align_out"
    seed: int = 0
    max_steps: int = 100
    budget_s: float | None = None  # also stop once training (sampling + reward + update) took this long
    prompts_per_step: int = 4  # per process
    group_size: int = 4  # samples per prompt (grpo)
    train_sampling_steps: int = 10
    eval_sampling_steps: int = 20
    resolution: int | None = None  # image side in pixels (default: the transformer's native sample size)
    guidance_scale: float = 4.0
    noise_level: float = 0.7  # SDE noise (grpo)
    timestep_fraction: float = 0.5  # share of the sampled steps trained on (grpo)
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    kl_coef: float = 0.0
    updates_per_step: int = 2  # optimizer steps per batch of samples (grpo): later ones see ratios != 1
    draft_k: int = 1  # steps back-propagated through (draft)
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    eval_every: int = 10
    checkpoint_every: int = 10
    max_sequence_length: int = 128  # T5 tokens of the prompt embeddings
    negative_prompt: str = ""
    dtype: str = "float32"
    gradient_checkpointing: bool = True  # draft: keep only each back-propagated step's input

    @classmethod
    def from_dict(cls, raw: dict) -> AlignConfig:
        config = from_dict(cls, raw)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown alignment method {self.method!r}; choose one of {METHODS}")
        if not self.generator or not self.prompts:
            raise ValueError("align needs a generator and prompts")
        if self.method == "grpo" and self.group_size < 2:
            raise ValueError(f"GRPO compares samples within a prompt's group: group_size must be >= 2, got {self.group_size}")
        if not 0 < self.timestep_fraction <= 1 or self.noise_level <= 0 and self.method == "grpo":
            raise ValueError("timestep_fraction must be in (0, 1] and noise_level > 0 for grpo")
        if self.method == "draft" and not 1 <= self.draft_k <= self.train_sampling_steps:
            raise ValueError(f"draft_k must be between 1 and train_sampling_steps ({self.train_sampling_steps})")
        if self.lora_rank < 1 or not self.lora_targets:
            raise ValueError("no trainable parameters: lora_rank must be >= 1 and lora_targets non-empty")
        if min(self.prompts_per_step, self.max_steps, self.updates_per_step, self.eval_every, self.checkpoint_every) < 1:
            raise ValueError("prompts_per_step, max_steps, updates_per_step, eval_every and checkpoint_every must be >= 1")
        self.reward.validate()
        if self.judge is not None:
            self.judge.validate()


def read_prompts(source: str, count: int | None = None, seed: int = 0) -> list[str]:
    """Prompts from a text file (one per line) or from the toy world (``toyworld:train`` / ``toyworld:test``)."""
    if source.startswith("toyworld:"):
        from dina_lrm.toyworld.scenes import sample_prompts

        return [spec.text for spec in sample_prompts(count or 256, source.split(":", 1)[1], seed)]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:count] if count else prompts


def latent_shape(transformer, vae, resolution: int | None) -> tuple[int, int, int]:
    config = transformer.config
    if resolution is None:
        return (config.in_channels, config.sample_size, config.sample_size)
    multiple = vae_scale_factor(vae) * config.patch_size
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a multiple of {multiple} (VAE factor x patch size)")
    side = resolution // vae_scale_factor(vae)
    return (config.in_channels, side, side)


class Aligner:
    def __init__(self, config: AlignConfig, pipe=None):
        config.validate()
        self.config = config
        self.accelerator = Accelerator(cpu=cpu_only())
        device = self.accelerator.device
        self.pipe = (pipe or load_pipeline(config.generator, DTYPES[config.dtype])).to(device)
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        transformer = self.pipe.transformer
        transformer.requires_grad_(False)
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                           target_modules=config.lora_targets))
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"no trainable parameters: lora_targets {config.lora_targets} match no module of the transformer")
        for parameter in trainable:  # the LoRA trains in float32 over a bf16/fp16 generator (PEFT casts its inputs)
            parameter.data = parameter.data.float()
        self.latent_shape = latent_shape(transformer, self.pipe.vae, config.resolution)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.policy, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        self.prompt_encoder = SD3PromptEncoder.from_pipeline(self.pipe, max_sequence_length=config.max_sequence_length)
        kwargs = dict(generator=config.generator, pipe=self.pipe, device=device, max_sequence_length=config.max_sequence_length,
                      dtype=config.dtype)
        self.reward = build_reward(config.reward, **kwargs)
        self.judge = build_reward(config.judge, **kwargs) if config.judge is not None else None
        if config.method == "draft" and not self.reward.differentiable:
            raise ValueError(f"DRaFT back-propagates through the reward, but {self.reward.name} is not differentiable; use grpo")
        self.train_prompts = read_prompts(config.prompts, seed=config.seed)
        self.eval_prompts = read_prompts(config.eval_prompts or config.prompts, config.num_eval_prompts, seed=config.seed + 1)
        self.train_schedule = Schedule.from_scheduler(self.pipe.scheduler, config.train_sampling_steps)
        self.eval_schedule = Schedule.from_scheduler(self.pipe.scheduler, config.eval_sampling_steps)
        self.out = Path(config.out)
        self.step, self.train_seconds, self.history = 0, 0.0, []

    # Text -------------------------------------------------------------------------------------

    def conditioning(self, prompts: list[str]) -> TextConditioning:
        states, pooled = self.prompt_encoder(prompts)
        negative, negative_pooled = self.prompt_encoder([self.config.negative_prompt])
        batch = len(prompts)
        return TextConditioning(states, pooled, negative.expand(batch, -1, -1), negative_pooled.expand(batch, -1))

    def step_generator(self) -> torch.Generator:
        """Seeded by (seed, step, process): a resumed run draws exactly what the uninterrupted one did."""
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + rank)

    def step_prompts(self, generator: torch.Generator) -> list[str]:
        index = torch.randint(len(self.train_prompts), (self.config.prompts_per_step,), generator=generator)
        return [self.train_prompts[i] for i in index.tolist()]

    # One step ---------------------------------------------------------------------------------

    def train_step(self) -> dict:
        generator = self.step_generator()
        prompts = self.step_prompts(generator)
        timings: dict[str, float] = {}
        with MemoryMeter(self.accelerator.device) as memory:
            stats = self.grpo_step(prompts, generator, timings) if self.config.method == "grpo" else self.draft_step(prompts, generator, timings)
        stats.update({f"time_{k}_s": v for k, v in timings.items()}, peak_memory_mib=memory.peak_mib)
        return stats

    def grpo_step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        config, schedule = self.config, self.train_schedule
        group = config.group_size
        expanded = [p for p in prompts for _ in range(group)]
        text = self.conditioning(prompts).repeat(group)
        start = time.perf_counter()
        self.policy.eval()
        trajectory = sample_sde(self.policy, schedule, text, self.latent_shape, config.guidance_scale, config.noise_level, generator)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            rewards = self.reward(trajectory.final, expanded, seed=int(torch.randint(2**31, (1,), generator=generator)))
        advantages = group_advantages(rewards.float().cpu(), group, config.advantage_clip).to(trajectory.final.device)
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        trained = max(1, round(config.timestep_fraction * schedule.num_steps))
        steps = torch.randperm(schedule.num_steps, generator=generator)[:trained].tolist()
        order = torch.randperm(len(expanded), generator=generator)
        losses, clip_fractions, kls = [], [], []
        self.policy.train()
        for minibatch in order.chunk(config.updates_per_step):
            self.optimizer.zero_grad(set_to_none=True)
            sub_text = text.index(minibatch)
            for i in steps:
                loss, clip_fraction, kl = self.grpo_loss(trajectory, i, minibatch, sub_text, advantages[minibatch])
                self.accelerator.backward(loss / len(steps))
                losses.append(loss.item())
                clip_fractions.append(float(clip_fraction))
                kls.append(float(kl))
            self.clip_and_step()
        timings["update"] = time.perf_counter() - start
        return {"samples": len(expanded), "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "loss": sum(losses) / len(losses),
                "clip_fraction": sum(clip_fractions) / len(clip_fractions), "kl": sum(kls) / len(kls)}

    def grpo_loss(self, trajectory, i: int, minibatch: torch.Tensor, text: TextConditioning, advantages: torch.Tensor):
        config, schedule = self.config, self.train_schedule
        sample, next_sample = trajectory.latents[i][minibatch], trajectory.latents[i + 1][minibatch]
        velocity = predict_velocity(self.policy, sample, schedule.timesteps[i], text, config.guidance_scale)
        step = schedule.step(i, sample, velocity, config.noise_level, next_sample=next_sample)
        loss, clip_fraction = clipped_policy_loss(step.log_prob, trajectory.log_probs[i][minibatch], advantages, config.clip_range)
        kl = torch.zeros(())
        if config.kl_coef > 0:
            with torch.no_grad(), self.reference_policy():
                reference = predict_velocity(self.policy, sample, schedule.timesteps[i], text, config.guidance_scale)
                reference_mean = schedule.step(i, sample, reference, config.noise_level, next_sample=next_sample).mean
            kl = gaussian_kl(step.mean, reference_mean, step.std).mean()
            loss = loss + config.kl_coef * kl
        return loss, clip_fraction, kl.detach()

    @contextmanager
    def reference_policy(self):
        """The frozen generator: the same transformer with its LoRA switched off."""
        model = self.accelerator.unwrap_model(self.policy)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    def draft_step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        config = self.config
        start = time.perf_counter()
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        text = self.conditioning(prompts)
        latents = sample_ode(self.policy, self.train_schedule, text, self.latent_shape, config.guidance_scale, generator,
                             grad_last_k=config.draft_k, checkpointed=config.gradient_checkpointing)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        rewards = self.reward(latents, prompts, seed=int(torch.randint(2**31, (1,), generator=generator)))
        if not torch.isfinite(rewards).all():
            raise ValueError(f"the reward {self.reward.name} returned NaN or inf")
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        loss = -rewards.mean()
        self.accelerator.backward(loss)
        self.clip_and_step()
        timings["update"] = time.perf_counter() - start
        rewards = rewards.detach()
        return {"samples": len(prompts), "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                "loss": float(loss), "clip_fraction": 0.0, "kl": 0.0}

    def clip_and_step(self) -> None:
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizer.step()

    # Evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out prompts, fixed seeds, ODE sampling with the evaluation step count."""
        config, state = self.config, self.accelerator
        prompts = self.eval_prompts[state.process_index :: state.num_processes]
        self.policy.eval()
        generator = torch.Generator().manual_seed(config.seed + 12345 + state.process_index)
        latents = sample_ode(self.policy, self.eval_schedule, self.conditioning(prompts), self.latent_shape, config.guidance_scale, generator)
        if state.is_main_process:
            save_sample_grid(self.pipe.vae, latents[:16], self.out / "samples" / f"step_{self.step:06d}.png")
        result = {"eval_reward": self.reward(latents, prompts, seed=config.seed)}
        if self.judge is not None:
            result["eval_judge"] = self.judge(latents, prompts, seed=config.seed)
        means = {}
        for name, values in result.items():  # the mean over all processes' prompts
            total = state.reduce(torch.tensor([float(values.float().sum()), float(len(values))], device=state.device), "sum")
            means[name] = float(total[0] / total[1])
        return means

    # Checkpoints ------------------------------------------------------------------------------

    def lora_state(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.accelerator.unwrap_model(self.policy))
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save_checkpoint(self) -> Path | None:
        directory = self.out / "checkpoints" / f"step_{self.step:06d}"
        if self.accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(self.lora_state(), str(directory / "lora.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            state = {"step": self.step, "train_seconds": self.train_seconds, "history": self.history, "config": asdict(self.config)}
            (directory / "trainer_state.json").write_text(json.dumps(state, indent=1))
        self.accelerator.wait_for_everyone()
        return directory

    def resume(self, checkpoint: str | Path) -> None:
        directory = Path(checkpoint)
        if str(checkpoint) == "latest":
            found = sorted((self.out / "checkpoints").glob("step_*"))
            if not found:
                raise FileNotFoundError(f"no checkpoint to resume under {self.out / 'checkpoints'}")
            directory = found[-1]
        if not (directory / "trainer_state.json").is_file():
            raise FileNotFoundError(f"not an alignment checkpoint: {directory} (no trainer_state.json)")
        state = json.loads((directory / "trainer_state.json").read_text())
        result = set_peft_model_state_dict(self.accelerator.unwrap_model(self.policy), load_file(str(directory / "lora.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{directory}: LoRA weights do not fit this generator ({result.unexpected_keys[:3]} ...)")
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.step, self.train_seconds, self.history = state["step"], state["train_seconds"], state["history"]
        if self.accelerator.is_main_process:  # the log restarts from the checkpoint, as the run does
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in self.history))

    # The loop ---------------------------------------------------------------------------------

    def run(self, resume: str | Path | None = None) -> list[dict]:
        """Train until max_steps (or budget_s of training time); returns the logged history."""
        config = self.config
        if resume:
            self.resume(resume)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        if not self.history:
            self.log({"step": 0, "train_seconds": 0.0, **self.evaluate()})
        progress = tqdm(total=config.max_steps if config.budget_s is None else None, initial=self.step, desc=f"align ({config.method})",
                        disable=not self.accelerator.is_main_process)
        while self.step < config.max_steps and (config.budget_s is None or self.train_seconds < config.budget_s):
            start = time.perf_counter()
            stats = self.train_step()
            self.train_seconds += time.perf_counter() - start
            self.step += 1
            record = {"step": self.step, "train_seconds": self.train_seconds, **stats}
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                record.update(self.evaluate())
            self.log(record)
            progress.update(1)
            progress.set_postfix(reward=f"{stats['reward_mean']:.3f}", **({"judge": f"{record['eval_judge']:.3f}"} if "eval_judge" in record else {}))
            if self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        if "eval_reward" not in self.history[-1]:
            self.history[-1].update(self.evaluate())
        self.save_final()
        return self.history

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def save_final(self) -> None:
        if self.accelerator.is_main_process:
            (self.out / "lora").mkdir(parents=True, exist_ok=True)
            save_file(self.lora_state(), str(self.out / "lora" / "lora.safetensors"))
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        self.accelerator.wait_for_everyone()


def save_sample_grid(vae, latents: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Decoded held-out samples as one PNG, ``columns`` per row."""
    images = (vae_decode(vae, latents) * 255).round().to(torch.uint8).cpu()
    rows = -(-len(images) // columns)
    height, width = images.shape[-2:]
    grid = torch.full((3, rows * height, min(columns, len(images)) * width), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def align(config: AlignConfig, resume: str | Path | None = None, pipe=None) -> list[dict]:
    return Aligner(config, pipe=pipe).run(resume)
