"""``dina-lrm train``: DiNa-LRM preference training under ``accelerate``.

DDP, FSDP or DeepSpeed come from the accelerate config the job is launched with; precision,
accumulation and clipping from ``training.*``. Chosen and rejected latents of a pair share one noise
level and one noise draw; the draws for a global batch come from a generator every process holds in
the same state, so N processes with batch B follow one process with batch N*B.

A checkpoint ``<run_dir>/checkpoints/step-NNNNNNN/`` holds the trainable weights, optimizer, LR
schedule, EMA, RNG states and data position as data only (``train/checkpoint.py``: safetensors and
JSON, a manifest with checksums written last), plus ``reward_model/``: the weights (their EMA with
``training.use_ema``) in the release layout, loadable by ``DiNaLRM.from_pretrained``. By default a run
trains as the release was trained: constant learning rate without warmup, no EMA. ``--resume latest`` continues exactly from the newest
checkpoint that verifies. ``metrics.jsonl`` and ``training_curves.png`` in the run directory record the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dina_lrm.config import DiNaConfig, config_differences, flatten_config
from dina_lrm.data.loader import pair_loader
from dina_lrm.distributed import cpu_only
from dina_lrm.eval.pairwise import pair_win_counts
from dina_lrm.models.backbones import prompt_encoder_for
from dina_lrm.memory import MemoryMeter
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.noise import NoiseSampler, SigmaTable
from dina_lrm.outputs import claim_output
from dina_lrm.train.checkpoint import (
    PARTIAL_SUFFIX,
    CheckpointError,
    begin_checkpoint,
    checkpoint_path,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    rng_states,
    save_state,
    set_rng_states,
    truncate_metrics,
    verify,
)
from dina_lrm.train.plots import plot_training_curves
from dina_lrm.train.step import PreferenceBatch, draw_noise, preference_forward

TRAINABLE_NAME = "trainable.safetensors"
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
TRAIN_OUTPUTS = ["checkpoints", METRICS_NAME, "reward_model", "training_curves.png"]
# Keys that may change between a run and its resumption without changing what the run computes.
RESUMABLE_CHANGES = ("training.num_epochs", "training.max_steps", "data.train.num_workers", "data.eval", "paths", "logging")
PRECISION = {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, data position, and the shared noise generator."""

    seed: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already trained on
    noise_generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.noise_generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "noise_generator": self.noise_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch, self.batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        self.noise_generator.set_state(state["noise_generator"])


def check_resumable(checkpoint: Path, config: DiNaConfig) -> None:
    """Fail, naming the keys, when ``checkpoint`` was written by a run with another configuration."""
    saved_path = checkpoint / CONFIG_NAME
    if not saved_path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint ({CONFIG_NAME} is missing)")
    saved = DiNaConfig.from_dict(json.loads(saved_path.read_text()))
    changed = [c for c in config_differences(saved, config) if not c.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ValueError(f"cannot resume from {checkpoint}: it was trained with another configuration ({'; '.join(changed)})")


class Trainer:
    """Builds the model, data and optimizer from a config; ``train()`` runs (or resumes) the job."""

    def __init__(self, config: DiNaConfig, pipe=None, *, resume: str | None = None, overwrite: bool = False):
        """``resume``: a checkpoint dir or ``"latest"``. The run directory is claimed before anything
        loads: one that holds another run is refused unless ``overwrite``."""
        self.config, self.resume_from = config, resume
        self.run_dir = config.paths.run_dir
        training = config.training
        self.accelerator = Accelerator(
            cpu=cpu_only(),
            mixed_precision=PRECISION[training.mixed_precision],
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            log_with=None if config.logging.report_to == "none" else config.logging.report_to,
            project_dir=str(self.run_dir),
        )
        set_seed(config.system.seed)
        inert = config.inert_release_keys()
        if inert and self.accelerator.is_main_process:
            warnings.warn("the authors' trainer ignores these keys, and so does this run (as the release was trained): "
                          + "; ".join(inert), stacklevel=2)
        if self.accelerator.is_main_process:
            outputs = [*TRAIN_OUTPUTS, config.paths.run_name]  # the trackers' folder
            claim_output(self.run_dir, "train", config.to_dict(), outputs, overwrite=overwrite, resume=bool(resume))
        self.accelerator.wait_for_everyone()
        self.loader = self._train_loader()
        self.eval_loaders = {name: self._eval_loader(section) for name, section in config.data.eval.items()}
        pipe = pipe if pipe is not None else self._load_pipeline()
        self.sigma_table = SigmaTable.from_scheduler(pipe.scheduler)
        self.sampler = NoiseSampler.from_release(training.t_weighting_scheme, training.t_weighting_scheme_param)
        cached_tokens = self.loader.dataset.prompt_tokens
        if cached_tokens is not None and cached_tokens != config.data.train.max_sequence_length:
            raise ValueError(f"the shards cache prompt embeddings of {cached_tokens} T5 tokens but data.train.max_sequence_length is "
                             f"{config.data.train.max_sequence_length}; set it to {cached_tokens}: the saved model records it, "
                             "and scoring encodes prompts with it")
        self.prompt_encoder = None
        if not self.loader.dataset.has_prompt_embeds:
            pipe.to(self.accelerator.device)
            self.prompt_encoder = prompt_encoder_for(pipe.transformer).from_pipeline(pipe, config.data.train.max_sequence_length)
        model = self._build_model(pipe.transformer)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=training.learning_rate, weight_decay=training.weight_decay)
        self.total_steps = self._total_steps()
        # The schedule is stepped once per optimizer step by this loop; accelerate would step a
        # prepared scheduler once per process.
        self.lr_scheduler = get_scheduler(
            training.lr_scheduler,
            optimizer,
            num_warmup_steps=training.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema = EMAModel(self.trainable, decay=training.ema_decay) if training.use_ema else None
        self.state = TrainState(config.system.seed)

    def _train_loader(self):
        data = self.config.data.train
        return pair_loader(
            data.parquet_files, data.base_batch_size, self.accelerator.num_processes, self.accelerator.process_index,
            seed=data.seed, shuffle=data.shuffle, num_workers=data.num_workers, bucket_file=data.bucket_file,
        )

    def _eval_loader(self, section):
        return pair_loader(
            section.parquet_files, section.batch_size, self.accelerator.num_processes, self.accelerator.process_index,
            shuffle=False, num_workers=section.num_workers, drop_last=False,
        )

    def _load_pipeline(self):
        """The generator's transformer and scheduler, and its text encoders unless the shards cache embeddings."""
        from dina_lrm.pipelines import load_pipeline

        skip = ["vae"] + (["text_encoder", "text_encoder_2", "text_encoder_3"] if self.loader.dataset.has_prompt_embeds else [])
        return load_pipeline(self.config.model.backbone_model_id, skip=skip)

    def _build_model(self, transformer) -> DiNaLRM:
        model = DiNaLRM(self.config, transformer).to(self.accelerator.device)
        model.enable_gradient_checkpointing(self.config.training.gradient_checkpointing)
        half = HALF.get(self.config.training.mixed_precision)
        if half is not None and self.config.model.backbone_mode != "full":
            model.to(half)  # frozen weights in half precision; the trained ones stay float32
            cast_training_params(model, torch.float32)
        return model.train()

    def _total_steps(self) -> int:
        if self.config.training.max_steps > 0:
            return self.config.training.max_steps
        per_epoch = len(self.loader) // self.config.training.gradient_accumulation_steps
        if per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(self.loader)} batches, fewer than gradient_accumulation_steps="
                f"{self.config.training.gradient_accumulation_steps}"
            )
        return self.config.training.num_epochs * per_epoch

    @property
    def unwrapped(self) -> DiNaLRM:
        return self.accelerator.unwrap_model(self.model)

    def _write_state(self, directory: Path) -> None:
        """Everything a resumed run needs, as data: weights, optimizer, schedule, EMA, data position, RNGs."""
        rank = self.accelerator.process_index
        if self.accelerator.is_main_process:
            state = {n: p.detach().float().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            save_file(state, str(directory / TRAINABLE_NAME))
            save_state(self.state.state_dict(), directory, "train_state")
            save_state(self.lr_scheduler.state_dict(), directory, "lr_scheduler")
            if self.ema is not None:
                save_state(self.ema.state_dict(), directory, "ema")
        if self.accelerator.is_main_process or self._sharded_optimizer:
            save_state(self.optimizer.state_dict(), directory, self._optimizer_name)
        save_state(rng_states(), directory, f"random_states_{rank}")

    def _read_state(self, directory: Path) -> None:
        state = load_file(str(directory / TRAINABLE_NAME))
        params = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"{directory}: trainable weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        self.state.load_state_dict(load_state(directory, "train_state"))
        self.lr_scheduler.load_state_dict(load_state(directory, "lr_scheduler"))
        if self.ema is not None:
            self.ema.load_state_dict(load_state(directory, "ema"))
        self.optimizer.load_state_dict(load_state(directory, self._optimizer_name))
        set_rng_states(load_state(directory, f"random_states_{self.accelerator.process_index}"))

    @property
    def _sharded_optimizer(self) -> bool:
        """Under FSDP and DeepSpeed each process holds its own part of the optimizer state."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @property
    def _optimizer_name(self) -> str:
        return f"optimizer_{self.accelerator.process_index}" if self._sharded_optimizer else "optimizer"

    def encode_prompts(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        if self.prompt_encoder is None:
            return batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
        # Uncached on purpose: an embedding must not depend on which earlier batch first encoded the
        # prompt, or a resumed run would drift from an uninterrupted one by rounding.
        with torch.no_grad():
            states, pooled = self.prompt_encoder.encode(batch["prompts"])
        return states.to(device), pooled.to(device)

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its sums (loss, correct, chosen, rejected, pairs)."""
        device, dtype = self.accelerator.device, self.unwrapped.dtype
        states, pooled = self.encode_prompts(batch)
        pairs = PreferenceBatch(
            chosen=batch["chosen"].to(device, dtype),
            rejected=batch["rejected"].to(device, dtype),
            encoder_hidden_states=states.to(dtype),
            pooled_projections=pooled.to(dtype),
            target=batch["confidence"].to(device),
        )
        noise = draw_noise(
            self.sigma_table, self.sampler, pairs.chosen.shape, self.state.noise_generator, self.config.training.add_noise,
            replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )
        with self.accelerator.autocast():
            out = preference_forward(self.model, pairs, noise, self.config.model.model_type)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"loss became {out.loss.item()} at step {self.state.global_step}; lower the learning rate or check the data")
        self.accelerator.backward(out.loss)
        size = len(out.chosen_scores)
        return torch.stack([
            out.loss.detach().float() * size,
            (out.chosen_scores > out.rejected_scores).float().sum(),
            out.chosen_scores.float().sum(),
            out.rejected_scores.float().sum(),
            torch.tensor(float(size), device=out.loss.device),
        ])

    def train(self) -> Path:
        """Train to ``total_steps`` (from the checkpoint given as ``resume``); returns the final reward model dir."""
        if self.resume_from:
            self.resume(self.resume_from)
        self.accelerator.init_trackers(self.config.paths.run_name, config=_tracker_config(self.config))
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="train", unit="step",
                   disable=not self.accelerator.is_local_main_process)
        window = torch.zeros(5, device=self.accelerator.device)
        clock = time.perf_counter()
        self.memory = MemoryMeter(self.accelerator.device).start()
        while self.state.global_step < self.total_steps:
            self.loader.batch_sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            for batch in self.loader:
                with self.accelerator.accumulate(self.model):
                    window += self._micro_step(batch)
                    grad_norm = None
                    if self.accelerator.sync_gradients:
                        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.config.training.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.state.batch_in_epoch += 1
                if not self.accelerator.sync_gradients:
                    continue
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.trainable)
                self.state.global_step += 1
                bar.update(1)
                step = self.state.global_step
                if step % self.config.logging.log_every == 0 or step == self.total_steps:
                    metrics = self._log_window(window, grad_norm, time.perf_counter() - clock)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/accuracy']:.2f}")
                    window.zero_()
                    clock = time.perf_counter()
                if self.eval_loaders and (step % self.config.logging.eval_frac == 0 or step == self.total_steps):
                    self.evaluate()
                if step % self.config.logging.save_frac == 0 or step == self.total_steps:
                    self.save_checkpoint()
                if step >= self.total_steps:
                    break
            else:
                self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        bar.close()
        self.memory.stop()
        final = self.save_reward_model(self.run_dir / "reward_model")
        if self.accelerator.is_main_process:
            plot_training_curves(self.run_dir / METRICS_NAME, self.run_dir / "training_curves.png")
        self.accelerator.end_training()
        return final

    def _log_window(self, window: torch.Tensor, grad_norm, seconds: float) -> dict:
        loss, correct, chosen, rejected, pairs = self.accelerator.reduce(window.clone(), "sum").tolist()
        metrics = {
            "train/loss": loss / pairs,
            "train/accuracy": correct / pairs,
            "train/chosen_mean": chosen / pairs,
            "train/rejected_mean": rejected / pairs,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "train/lr": self.lr_scheduler.get_last_lr()[0],
            "train/pairs_per_s": pairs / max(seconds, 1e-9),
            "train/peak_memory_gb": self.memory.peak_so_far_bytes() / 2**30,
        }
        self._record(metrics)
        return metrics

    def _record(self, metrics: dict) -> None:
        self.accelerator.log(metrics, step=self.state.global_step)
        if self.accelerator.is_main_process:
            with (self.run_dir / METRICS_NAME).open("a") as handle:
                handle.write(json.dumps({"step": self.state.global_step, **metrics}) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Pairwise accuracy per eval set and u (the EMA weights with training.use_ema), summed over all processes."""
        u_values = self.config.logging.eval_u
        metrics = {}
        with self.ema_weights(), self.accelerator.autocast():
            model = self.unwrapped.eval()
            for name, loader in self.eval_loaders.items():
                totals = pair_win_counts(model, loader, self.encode_prompts, self.sigma_table, u_values,
                                         seed=self.config.system.seed + self.accelerator.process_index)
                totals = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").cpu()
                for u, (wins, count) in zip(u_values, totals.tolist()):
                    metrics[f"eval/{name}/accuracy_u{u:g}"] = wins / count
            model.train()
        self._record(metrics)
        return metrics

    def ema_weights(self):
        return _EMASwap(self.ema, self.trainable)

    def save_checkpoint(self) -> Path:
        """Write the full training state; a crash mid-write leaves no checkpoint that ``latest`` would pick."""
        directory = checkpoint_path(self.run_dir, self.state.global_step)
        partial = directory.with_name(directory.name + PARTIAL_SUFFIX)
        if self.accelerator.is_main_process:
            begin_checkpoint(directory)
        self.accelerator.wait_for_everyone()
        self._write_state(partial)
        self.save_reward_model(partial / "reward_model")
        if self.accelerator.is_main_process:
            (partial / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
            commit_checkpoint(partial)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        return directory

    def _prune_checkpoints(self) -> None:
        limit = self.config.logging.checkpoints_total_limit
        if limit > 0:
            for old in list_checkpoints(self.run_dir)[:-limit]:
                shutil.rmtree(old)

    def save_reward_model(self, directory: Path) -> Path:
        """The weights (their EMA with training.use_ema) in the release layout (main process writes; all wait)."""
        self.accelerator.wait_for_everyone()
        with self.ema_weights():
            if self.accelerator.is_main_process:
                self.unwrapped.save_pretrained(directory)
        self.accelerator.wait_for_everyone()
        return directory

    def resume(self, resume: str) -> None:
        """Load a checkpoint (``"latest"``: the newest that verifies); the log is cut back to its step."""
        if resume == "latest":
            checkpoint, skipped = latest_checkpoint(self.run_dir)
            for line in skipped:
                self.accelerator.print(line)
        else:
            checkpoint = Path(resume)
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
            verify(checkpoint)
        check_resumable(checkpoint, self.config)
        try:
            self._read_state(checkpoint)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot resume from {checkpoint}: {err}") from err
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir / METRICS_NAME, self.state.global_step)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.global_step}")


class _EMASwap:
    """Context manager: the EMA weights in place of the trained ones (no-op without EMA)."""

    def __init__(self, ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
        self.ema, self.parameters = ema, parameters

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.parameters)


def _tracker_config(config: DiNaConfig) -> dict:
    """Trackers take scalars only: lists and None as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten_config(config.to_dict()).items()}


def train(config: DiNaConfig, resume: str | None = None, pipe=None, overwrite: bool = False) -> Path:
    return Trainer(config, pipe, resume=resume, overwrite=overwrite).train()
