"""``dina-lrm align``: preference optimisation of a rectified-flow generator's LoRA against rewards.

One loop (accelerate: each process samples its own prompts, gradients are averaged) runs any method
of ``align/methods/`` (``grpo``, ``refl``, ``nft``, ``draft``) on any generator family with a policy
adapter (``models/*_policy.py``: SD3 / SD3.5, FLUX.1, Z-Image, Qwen-Image). The loop owns the policy's
LoRA and optimizer, the rewards (built before the LoRA, so a DiNa-LRM on the same generator shares its
frozen weights), the EMA, evaluation and the hacking guard, checkpoints and outputs.

Every ``eval_every`` steps the validation prompts are sampled with fixed seeds and scored by the reward
and by an independent judge; the best evaluation by the judge is kept (``best/``), and at the end the
base generator and the kept checkpoint are both scored on test prompts that never picked anything.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dina_lrm.align.config import AlignConfig, read_prompts
from dina_lrm.align.ema import EMA
from dina_lrm.align.guard import JudgeGuard
from dina_lrm.align.methods import method_class
from dina_lrm.align.reward_spec import build_reward
from dina_lrm.align.sampling import VelocityFn, initial_noise, sample_ode
from dina_lrm.data.images import vae_decode
from dina_lrm.distributed import cpu_only
from dina_lrm.memory import MemoryMeter
from dina_lrm.models.backbones import policy_for
from dina_lrm.models.policy import Schedule, TextConditioning
from dina_lrm.outputs import claim_output
from dina_lrm.pipelines import DTYPES, load_pipeline
from dina_lrm.train.checkpoint import (
    begin_checkpoint,
    checkpoint_path,
    commit_checkpoint,
    latest_checkpoint,
    load_state,
    save_state,
    verify,
)

ALIGN_OUTPUTS = ["checkpoints", "metrics.jsonl", "lora", "best", "samples", "history.json", "summary.json"]


class Aligner:
    def __init__(self, config: AlignConfig, pipe=None, *, resume: str | Path | None = None, overwrite: bool = False):
        """``resume``: a checkpoint dir or ``"latest"``. ``config.out`` is claimed before anything loads:
        a folder that holds another run is refused unless ``overwrite``."""
        config.validate()
        self.config, self.resume_from = config, resume
        self.accelerator = Accelerator(cpu=cpu_only())
        if self.accelerator.is_main_process:
            settings = {k: v for k, v in asdict(config).items() if k != "out"}
            claim_output(Path(config.out), "align", settings, ALIGN_OUTPUTS, overwrite=overwrite, resume=bool(resume))
        self.accelerator.wait_for_everyone()
        device = self.accelerator.device
        self.pipe = (pipe or load_pipeline(config.generator, DTYPES[config.dtype])).to(device)
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.adapter = policy_for(self.pipe, config.max_sequence_length)
        # the rewards first: a DiNa-LRM on this generator shares its weights, before the policy's LoRA exists
        kwargs = dict(generator=config.generator, pipe=self.pipe, device=device, dtype=config.dtype)
        self.rewards = [build_reward(spec, **kwargs) for spec in config.all_rewards]
        self.judge = build_reward(config.judge, **kwargs) if config.judge is not None else None
        self.policy, self.optimizer, self.trainable = self.add_policy_lora(self.pipe.transformer)
        self.ema = EMA(self.trainable, config.ema, config.ema_every) if config.ema else None
        self.latent_shape = self.adapter.latent_shape(config.resolution)
        self.train_guidance = self.default_guidance() if config.guidance_scale is None else config.guidance_scale
        self.eval_guidance = self.train_guidance if config.eval_guidance_scale is None else config.eval_guidance_scale
        self.train_prompts = read_prompts(config.prompts)
        self.eval_prompts = read_prompts(config.eval_prompts or config.prompts, config.num_eval_prompts)
        self.test_prompts = read_prompts(config.test_prompts, config.num_test_prompts) if config.test_prompts else []
        self.train_schedule = self.adapter.schedule(config.sampling_steps, self.latent_shape)
        self.eval_schedule = self.adapter.schedule(config.eval_sampling_steps, self.latent_shape)
        self.method = method_class(config.method)(self)
        self.out = Path(config.out)
        self.guard = JudgeGuard(config.early_stop_patience, config.divergence_tolerance)
        self.step, self.train_seconds, self.train_cpu_seconds, self.history, self.test = 0, 0.0, 0.0, [], {}
        self.best_lora: dict[str, torch.Tensor] | None = None

    def default_guidance(self) -> float:
        """DiffusionNFT rolls out without classifier-free guidance; the other methods use the pipeline's default."""
        default = self.adapter.default_guidance
        return self.adapter.conditional_scale(default) if self.config.method == "nft" else default

    def add_policy_lora(self, transformer):
        config = self.config
        targets = config.lora_targets or self.adapter.lora_targets
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        try:
            transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                               target_modules=targets))
        except ValueError as error:
            raise ValueError(f"no trainable parameters: lora_targets {targets} match no module of the transformer ({error})") from None
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        for parameter in trainable:  # the LoRA trains in float32 over a bf16/fp16 generator (PEFT casts its inputs)
            parameter.data = parameter.data.float()
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        policy, optimizer = self.accelerator.prepare(transformer, optimizer)
        return policy, optimizer, trainable

    @property
    def reward(self):
        """The reward being optimised (the first of ``rewards``)."""
        return self.rewards[0]

    # Text and velocities ----------------------------------------------------------------------

    def conditioning(self, prompts: list[str]) -> TextConditioning:
        return self.adapter.encode(prompts, self.config.negative_prompt)

    def velocity_fn(self, text: TextConditioning, schedule: Schedule, guidance: float | None = None) -> VelocityFn:
        """``velocity(x, i)``: the policy's guided velocity at step i of ``schedule`` (training guidance by default)."""
        scale = self.train_guidance if guidance is None else guidance
        return lambda x, i: self.adapter.velocity(self.policy, x, float(schedule.sigmas[i]), text, scale)

    def step_generator(self) -> torch.Generator:
        """Seeded by (seed, step, process): a resumed run draws exactly what the uninterrupted one did."""
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + rank)

    def step_prompts(self, generator: torch.Generator) -> list[str]:
        index = torch.randint(len(self.train_prompts), (self.config.prompts_per_step,), generator=generator)
        return [self.train_prompts[i] for i in index.tolist()]

    @staticmethod
    def reward_seed(generator: torch.Generator) -> int:
        return int(torch.randint(2**31, (1,), generator=generator))

    # One step ---------------------------------------------------------------------------------

    def train_step(self) -> dict:
        generator = self.step_generator()
        prompts = self.step_prompts(generator)
        timings: dict[str, float] = {}
        with MemoryMeter(self.accelerator.device) as memory:
            stats = self.method.step(prompts, generator, timings)
        if self.ema is not None:
            self.ema.update(self.step + 1)
        self.method.after_step(self.step + 1)
        stats.update({f"time_{k}_s": v for k, v in timings.items()}, peak_memory_mib=memory.peak_mib)
        return stats

    @property
    def reward_weights(self) -> list[float]:
        return self.config.reward_weights

    def score_all(self, latents: torch.Tensor, prompts: list[str], seed: int) -> list[torch.Tensor]:
        """Every reward's scores (a reward of weight 0 only logged, without a graph); NaN or inf is refused
        with the reward's name."""
        scores = []
        for reward, weight in zip(self.rewards, self.reward_weights):
            with torch.no_grad() if not weight else nullcontext():
                values = reward(latents, prompts, seed=seed)
            if not torch.isfinite(values.detach()).all():
                raise ValueError(f"the reward {reward.name} returned NaN or inf")
            scores.append(values)
        return scores

    def reward_stats(self, scores: list[torch.Tensor]) -> dict:
        stats = {"samples": len(scores[0]), "reward_mean": float(scores[0].detach().mean()),
                 "reward_std": float(scores[0].detach().std()) if len(scores[0]) > 1 else 0.0}
        stats.update({f"reward_mean/{reward.name}": float(values.detach().mean()) for reward, values in zip(self.rewards[1:], scores[1:])})
        return stats

    @contextmanager
    def reference_policy(self):
        """The frozen generator: the same transformer with its LoRA switched off."""
        model = self.accelerator.unwrap_model(self.policy)
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    def clip_and_step(self) -> None:
        parameters = [p for p in self.policy.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizer.step()

    # Evaluation -------------------------------------------------------------------------------

    def evaluated_weights(self):
        """The weights evaluations and saves use: the EMA's when there is one."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    @torch.no_grad()
    def score_prompts(self, prompts: list[str], seed: int, grid: Path | None = None) -> dict[str, np.ndarray]:
        """Per prompt (one ODE sample each, fixed seeds, split over processes): the reward, the judge
        and the judge's details, as arrays in ``prompts`` order."""
        config, state = self.config, self.accelerator
        local = list(range(state.process_index, len(prompts), state.num_processes))
        self.policy.eval()
        generator = torch.Generator().manual_seed(seed + state.process_index)
        text = self.conditioning([prompts[i] for i in local])
        noise = initial_noise(len(local), self.latent_shape, generator, text.states.device)
        with torch.no_grad():
            latents = sample_ode(self.velocity_fn(text, self.eval_schedule, self.eval_guidance), self.eval_schedule, noise)
        if grid is not None and state.is_main_process:
            save_sample_grid(self.pipe.vae, latents[:16], grid)
        local_prompts = [prompts[i] for i in local]
        values = {"reward": self.reward(latents, local_prompts, seed=config.seed).float().cpu().numpy()}
        if self.judge is not None:
            values["judge"] = self.judge(latents, local_prompts, seed=config.seed).float().cpu().numpy()
            values.update({f"judge/{k}": v for k, v in self.judge.details.items()})
        rows = gather_object([(i, {k: float(v[n]) for k, v in values.items()}) for n, i in enumerate(local)])
        rows = [row for _, row in sorted(rows, key=lambda item: item[0])]
        return {key: np.array([row[key] for row in rows]) for key in rows[0]}

    def evaluate(self) -> dict:
        """Validation means: ``eval_reward``, ``eval_judge`` and ``eval_judge/<detail>``."""
        with self.evaluated_weights():
            values = self.score_prompts(self.eval_prompts, self.config.seed + 12345, self.out / "samples" / f"step_{self.step:06d}.png")
        return {f"eval_{key}": float(np.nanmean(array)) for key, array in values.items() if np.isfinite(array).any()}

    def evaluate_test(self, name: str) -> None:
        """Score the current weights on the test prompts as ``self.test[name]`` (per prompt)."""
        if self.test_prompts:
            grid = self.out / "samples" / f"test_{name}.png"
            values = self.score_prompts(self.test_prompts, self.config.seed + 54321, grid)
            self.test[name] = {key: [x if np.isfinite(x) else None for x in array.tolist()] for key, array in values.items()}

    # Checkpoints ------------------------------------------------------------------------------

    def lora_state(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.accelerator.unwrap_model(self.policy))
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_lora_state(self, state: dict[str, torch.Tensor], origin: Path) -> None:
        result = set_peft_model_state_dict(self.accelerator.unwrap_model(self.policy), state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{origin}: LoRA weights do not fit this generator ({result.unexpected_keys[:3]} ...)")

    @contextmanager
    def lora_weights(self, state: dict[str, torch.Tensor]):
        """``state`` in place of the current LoRA weights, restored afterwards."""
        current = self.lora_state()
        self.load_lora_state(state, Path("best"))
        try:
            yield
        finally:
            self.load_lora_state(current, Path("current"))

    def keep_if_best(self, record: dict) -> None:
        """Let the guard see an evaluation; the best one's (evaluated) weights are kept in ``best/``."""
        if "eval_judge" not in record or not self.guard.observe(record["step"], record["eval_reward"], record["eval_judge"]):
            return
        with self.evaluated_weights():
            self.best_lora = self.lora_state()
        if self.accelerator.is_main_process:
            (self.out / "best").mkdir(parents=True, exist_ok=True)
            save_file(self.best_lora, str(self.out / "best" / "lora.safetensors"))
            (self.out / "best" / "step.json").write_text(json.dumps({"step": record["step"], "eval_judge": record["eval_judge"]}))

    def save_checkpoint(self) -> Path:
        """The run's state as data, written as train's checkpoints are (atomic, with a manifest)."""
        directory = checkpoint_path(self.out, self.step)
        if self.accelerator.is_main_process:
            partial = begin_checkpoint(directory)
            save_file(self.lora_state(), str(partial / "lora.safetensors"))
            if self.best_lora is not None:
                save_file(self.best_lora, str(partial / "best_lora.safetensors"))
            if self.ema is not None:
                save_state(self.ema.state_dict(), partial, "ema")
            if self.method.state_dict():
                save_file(self.method.state_dict(), str(partial / "method.safetensors"))
            save_state(self.optimizer.state_dict(), partial, "optimizer")
            state = {"step": self.step, "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                     "history": self.history, "test": self.test, "config": asdict(self.config)}
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
            commit_checkpoint(partial)
        self.accelerator.wait_for_everyone()
        return directory

    def resume(self, checkpoint: str | Path) -> None:
        """Load a checkpoint (``"latest"``: the newest that verifies); data only, never a pickle."""
        directory = Path(checkpoint)
        if str(checkpoint) == "latest":
            directory, skipped = latest_checkpoint(self.out)
            for line in skipped:
                self.accelerator.print(line)
        if not (directory / "trainer_state.json").is_file():
            raise FileNotFoundError(f"not an alignment checkpoint: {directory} (no trainer_state.json)")
        verify(directory)
        state = json.loads((directory / "trainer_state.json").read_text())
        self.load_lora_state(load_file(str(directory / "lora.safetensors")), directory)
        if (directory / "best_lora.safetensors").is_file():
            self.best_lora = load_file(str(directory / "best_lora.safetensors"))
        if self.ema is not None:
            self.ema.load_state_dict(load_state(directory, "ema"))
        if (directory / "method.safetensors").is_file():
            self.method.load_state_dict(load_file(str(directory / "method.safetensors")))
        self.optimizer.load_state_dict(load_state(directory, "optimizer"))
        self.step, self.history, self.test = state["step"], state["history"], state["test"]
        self.train_seconds, self.train_cpu_seconds = state["train_seconds"], state["train_cpu_seconds"]
        self.guard = JudgeGuard.from_history(self.history, self.config.early_stop_patience, self.config.divergence_tolerance)
        if self.accelerator.is_main_process:  # the log restarts from the checkpoint, as the run does
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in self.history))

    # The loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Train for max_steps (or until the judge stops improving); returns the logged history."""
        config = self.config
        if self.resume_from:
            self.resume(self.resume_from)
        if not self.history:
            self.evaluate_test("base")
            self.log_evaluated({"step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0, **self.evaluate()})
        progress = tqdm(total=config.max_steps, initial=self.step, desc=f"align ({config.method})", disable=not self.accelerator.is_main_process)
        while self.step < config.max_steps and not self.guard.should_stop:
            wall, cpu = time.perf_counter(), time.process_time()
            stats = self.train_step()
            self.train_seconds += time.perf_counter() - wall
            self.train_cpu_seconds += time.process_time() - cpu
            self.step += 1
            record = {"step": self.step, "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds, **stats}
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                record.update(self.evaluate())
            self.log_evaluated(record)
            progress.update(1)
            progress.set_postfix({key: f"{record[name]:.3f}" for key, name in (("reward", "reward_mean"), ("judge", "eval_judge")) if name in record})
            if self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        self.finish()
        return self.history

    def log_evaluated(self, record: dict) -> None:
        self.history.append(record)
        self.keep_if_best(record)
        if self.accelerator.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """Score the final and the kept weights on the test prompts; write the final LoRA and ``summary.json``."""
        with self.evaluated_weights():
            self.evaluate_test("final")
            final = self.lora_state()
        if self.best_lora is not None:
            with self.lora_weights(self.best_lora):
                self.evaluate_test("best")
        if self.accelerator.is_main_process:
            (self.out / "lora").mkdir(parents=True, exist_ok=True)
            save_file(final, str(self.out / "lora" / "lora.safetensors"))
            (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
            (self.out / "summary.json").write_text(json.dumps(self.summary(), indent=1))
        self.accelerator.wait_for_everyone()

    def summary(self) -> dict:
        best = self.guard.best
        return {
            "steps": self.step,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "best": {"step": best.step, "eval_judge": best.judge, "eval_reward": best.reward} if best else None,
            "divergence_step": self.guard.divergence_step(),
            "stopped_early": self.step < self.config.max_steps,
            "test_prompts": self.test_prompts,
            "test": self.test,
        }


def save_sample_grid(vae, latents: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Decoded samples as one PNG, ``columns`` per row."""
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


def align(config: AlignConfig, resume: str | Path | None = None, pipe=None, overwrite: bool = False) -> list[dict]:
    return Aligner(config, pipe=pipe, resume=resume, overwrite=overwrite).run()
