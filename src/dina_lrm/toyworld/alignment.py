"""``dina-lrm toyworld align`` (``make demo-align``): the paper's alignment experiment in the toy world.

1. **The base policy**: the shipped early toy generator (a short pretraining on the same VAE, so in the
   same latent space), which fails often enough to leave room: held-out judge about 0.6.
2. **The rewards**, trained for a fixed number of steps on preference pairs of the base's own samples and
   corrupted renders: DiNa-LRM on the base's transformer (so under ReFL it shares the policy's frozen
   weights, as the paper's SD3.5-M reward does) and the pixel reward that must decode.
3. **The runs**, each for a fixed number of steps and several seeds: ReFL and GRPO with DiNa-LRM and
   with the pixel reward, and GRPO with the judge itself (the loop's sanity check). The judge scores
   validation prompts every few steps and picks the checkpoint to keep; test prompts, disjoint from the
   training and validation prompts, score the base and the kept checkpoint.
4. **The report**: judge gain on the test prompts with a bootstrap interval over prompts (all seeds),
   per clause before and after, validation judge against training CPU-seconds, the cost per step
   (time, FLOPs, peak memory) beside the paper's table, and sample grids.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModelWithProjection

from dina_lrm.align.config import AlignConfig
from dina_lrm.align.rewards import RewardSpec, build_reward
from dina_lrm.align.sampling import Schedule, TextConditioning, predict_velocity
from dina_lrm.align.trainer import Aligner
from dina_lrm.data.shards import load_preference_shards
from dina_lrm.eval.cost import count_flops
from dina_lrm.eval.pairwise import bootstrap_interval
from dina_lrm.models.sd3_text import SD3PromptEncoder
from dina_lrm.scorer import load_pipeline
from dina_lrm.toyworld.demo import SHIPPED_GENERATOR, DemoConfig, build_preference_data, subset, train_dina, train_pixel
from dina_lrm.toyworld.generator import T5_TOKENS
from dina_lrm.toyworld.preferences import PreferenceDataConfig
from dina_lrm.toyworld.alignment_report import write_alignment_report
from dina_lrm.toyworld.rewards import CLAUSES, load_pixel_reward, save_pixel_reward
from dina_lrm.toyworld.scenes import sample_prompts
from dina_lrm.train.pairs import PairBatches

EARLY_GENERATOR = Path(__file__).parent / "pretrained_early"
JUDGE = RewardSpec(kind="python", target="dina_lrm.toyworld.rewards:judge", name="judge")
RUNS = {  # name: (method, reward)
    "ReFL + DiNa-LRM": ("refl", "dina"),
    "ReFL + pixel reward": ("refl", "pixel"),
    "GRPO + DiNa-LRM": ("grpo", "dina"),
    "GRPO + pixel reward": ("grpo", "pixel"),
    "GRPO + judge": ("grpo", "judge"),
}


REFL_SETTINGS = dict(max_steps=40, prompts_per_step=8, train_sampling_steps=12, refl_stop_range=[6, 12], learning_rate=1e-3,
                     eval_every=5, early_stop_patience=3)
GRPO_SETTINGS = dict(max_steps=36, prompts_per_step=8, group_size=4, train_sampling_steps=10, noise_level=0.7, sde_window_size=3,
                     sde_window_range=[0, 6], global_std=True, learning_rate=3e-4, clip_range=0.2, updates_per_step=2,
                     eval_every=12)


@dataclass
class ToyAlignmentConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    data: PreferenceDataConfig = field(default_factory=lambda: PreferenceDataConfig(train_prompts=300, test_prompts=40))
    reward_steps: int = 300  # optimizer steps of DiNa-LRM and of the pixel reward
    reward_batch_size: int = 32
    reward_learning_rate: float = 5e-4
    train_prompts: int = 512
    num_val_prompts: int = 32
    num_test_prompts: int = 64
    eval_sampling_steps: int = 12
    guidance_scale: float = 4.0
    refl: dict = field(default_factory=dict)  # AlignConfig keys over REFL_SETTINGS for the ReFL runs
    grpo: dict = field(default_factory=dict)  # AlignConfig keys over GRPO_SETTINGS for the GRPO runs
    workers: int = 2  # runs in parallel processes of one thread each (the toy models use one core poorly)


def materialise_base(out: Path) -> Path:
    """The early generator as a full pipeline directory: the shipped VAE, tokenizers and scheduler with
    the early checkpoint's transformer and text encoders."""
    directory = out / "base_generator"
    if (directory / "model_index.json").is_file():
        return directory
    pipe = load_pipeline(SHIPPED_GENERATOR)
    pipe.transformer = SD3Transformer2DModel.from_pretrained(str(EARLY_GENERATOR / "transformer"), torch_dtype=torch.float32)
    for name in ("text_encoder", "text_encoder_2"):
        setattr(pipe, name, CLIPTextModelWithProjection.from_pretrained(str(EARLY_GENERATOR / name), torch_dtype=torch.float32))
    pipe.save_pretrained(str(directory))
    return directory


def write_prompt_sets(out: Path, config: ToyAlignmentConfig, seed: int = 0) -> dict[str, Path]:
    """Train, validation and test prompts of the toy world's train split, pairwise disjoint."""
    wanted = config.train_prompts + config.num_val_prompts + config.num_test_prompts
    prompts = [spec.text for spec in sample_prompts(wanted, "train", seed + 2024)]
    if len(prompts) < wanted:
        raise ValueError(f"the toy world has only {len(prompts)} distinct train-split prompts; asked for {wanted}")
    sets = {"train": prompts[: config.train_prompts],
            "val": prompts[config.train_prompts : config.train_prompts + config.num_val_prompts],
            "test": prompts[config.train_prompts + config.num_val_prompts :]}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, texts in sets.items():
        paths[name] = out / f"prompts_{name}.txt"
        paths[name].write_text("\n".join(texts) + "\n")
    return paths


def train_rewards(out: Path, base_dir: Path, config: ToyAlignmentConfig) -> dict:
    """Preference pairs of the base generator's samples, then DiNa-LRM and the pixel reward for
    ``reward_steps`` steps each; returns their paths and held-out accuracies."""
    pipe = load_pipeline(base_dir)
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    data = build_preference_data(pipe, prompt_encoder, config.data, out / "shards")
    train_pairs, test_pairs = load_preference_shards(out / "shards" / "train"), load_preference_shards(out / "shards" / "test")
    monitor = subset(test_pairs, range(min(256, len(test_pairs))))
    demo = DemoConfig(steps=config.reward_steps, batch_size=config.reward_batch_size, learning_rate=config.reward_learning_rate)
    batches = PairBatches(train_pairs, prompt_encoder, demo.batch_size, demo.seed)
    dina, dina_history = train_dina(pipe, prompt_encoder, "thurstone", batches, monitor, demo, "DiNa-LRM")
    batches = PairBatches(train_pairs, prompt_encoder, demo.batch_size, demo.seed)
    pixel, pixel_history = train_pixel(pipe, prompt_encoder, batches, monitor, demo)
    return {
        "dina": str(dina.save_pretrained(out / "reward_model")),
        "pixel": str(save_pixel_reward(pixel, out / "pixel_reward.safetensors")),
        "heldout_accuracy": {"DiNa-LRM": dina_history[-1]["heldout_accuracy"], "pixel reward": pixel_history[-1]["heldout_accuracy"]},
        "pairs": {"train": len(train_pairs), "test": len(test_pairs)},
        "base_judge_on_train_prompts": data["train"]["generator_judge_score"],
    }


def reward_spec(kind: str, rewards: dict, base_dir: Path) -> RewardSpec:
    if kind == "dina":
        return RewardSpec(kind="dina", path=rewards["dina"], u=0.4, name="DiNa-LRM")
    if kind == "pixel":
        return RewardSpec(kind="python", target="dina_lrm.toyworld.rewards:pixel_reward", name="pixel reward", differentiable=True,
                          kwargs={"path": rewards["pixel"], "generator": str(base_dir)})
    return JUDGE


def align_config(name: str, seed: int, rewards: dict, base_dir: Path, prompts: dict[str, Path], out: Path,
                 config: ToyAlignmentConfig) -> AlignConfig:
    method, kind = RUNS[name]
    settings = {**REFL_SETTINGS, **config.refl} if method == "refl" else {**GRPO_SETTINGS, **config.grpo}
    return AlignConfig.from_dict({
        "method": method, "generator": str(base_dir), "reward": asdict(reward_spec(kind, rewards, base_dir)), "judge": asdict(JUDGE),
        "prompts": str(prompts["train"]), "eval_prompts": str(prompts["val"]), "num_eval_prompts": config.num_val_prompts,
        "test_prompts": str(prompts["test"]), "num_test_prompts": config.num_test_prompts, "out": str(out), "seed": seed,
        "eval_sampling_steps": config.eval_sampling_steps, "guidance_scale": config.guidance_scale,
        "checkpoint_every": 10**9, "max_sequence_length": T5_TOKENS, **settings,
    })


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' + ', '_').replace(' ', '_').lower()}_seed{seed}"


def run_alignment_experiment(out: str | Path, config: ToyAlignmentConfig | None = None, overwrite: bool = False) -> dict:
    """Everything above; writes ``alignment.md``, ``alignment.json`` and plots under ``out``. Refuses an
    ``out`` that holds an earlier experiment unless ``overwrite``."""
    config = config or ToyAlignmentConfig()
    out = Path(out)
    if (out / "alignment.json").exists() or (out / "runs").exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds an earlier alignment experiment; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    base_dir = materialise_base(out)
    prompts = write_prompt_sets(out, config)
    rewards = train_rewards(out, base_dir, config)
    jobs = [(name, seed, align_config(name, seed, rewards, base_dir, prompts, run_dir(out, name, seed), config))
            for name in config.runs for seed in config.seeds]
    # the costly GRPO runs first, so that the cheap ReFL runs fill the workers at the end
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][2].method != "grpo")
    finished = dict(zip(order, in_workers(run_one, [(jobs[i][2],) for i in order], config.workers)))
    runs: dict[str, list[dict]] = {}
    for i, (name, seed, _) in enumerate(jobs):
        history, summary = finished[i]
        runs.setdefault(name, []).append({"seed": seed, "history": history, "summary": summary})
    result = {"config": {**asdict(config), "settings": {"refl": REFL_SETTINGS, "grpo": GRPO_SETTINGS}}, "rewards": rewards,
              "flops": reward_costs(rewards, base_dir, config),
              "runs": {name: summarise(seeds) for name, seeds in runs.items()},
              "histories": {name: [s["history"] for s in seeds] for name, seeds in runs.items()}}
    write_alignment_report(out, result, {name: run_dir(out, name, config.seeds[0]) for name in config.runs})
    (out / "alignment.json").write_text(json.dumps(result, indent=1))
    return result


def run_one(config: AlignConfig) -> tuple[list[dict], dict]:
    """One alignment run: its history and ``summary.json``."""
    history = Aligner(config).run()
    return history, json.loads((Path(config.out) / "summary.json").read_text())


def in_workers(fn, calls: list[tuple], workers: int) -> list:
    """``[fn(*args) for args in calls]``, over ``workers`` spawned processes of one thread each (1: here).
    Every call is seeded and fixed in steps, so results do not depend on how the calls are spread."""
    if workers <= 1:
        return [fn(*args) for args in calls]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        return list(pool.map(fn, *zip(*calls)))


def reward_costs(rewards: dict, base_dir: Path, config: ToyAlignmentConfig, batch: int = 8) -> dict:
    """Per sample of a ReFL step, for DiNa-LRM and the pixel reward: FLOPs of the reward forward, of the
    update (back-propagation through the reward, plus the policy step's forward and backward) and of
    sampling up to the middle of the stop window; and the memory the reward adds: its own weights (not
    shared with the policy) plus the activations autograd keeps for the backward. Counted, not timed."""
    pipe = load_pipeline(base_dir)
    kwargs = dict(generator=str(base_dir), pipe=pipe, device="cpu")
    built = {kind: build_reward(reward_spec(kind, rewards, base_dir), **kwargs) for kind in ("dina", "pixel")}
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    prompts = [spec.text for spec in sample_prompts(batch, "train", 7)]
    states, pooled = prompt_encoder(prompts)
    negative, negative_pooled = prompt_encoder([""])
    text = TextConditioning(states, pooled, negative.expand(batch, -1, -1), negative_pooled.expand(batch, -1))
    shape = (batch, pipe.transformer.config.in_channels, pipe.transformer.config.sample_size, pipe.transformer.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    refl = {**REFL_SETTINGS, **config.refl}
    schedule = Schedule.from_scheduler(pipe.scheduler, refl["train_sampling_steps"])
    stop = sum(refl["refl_stop_range"]) // 2
    sampling = count_flops(lambda: predict_velocity(pipe.transformer, latents, schedule.timesteps[0], text, config.guidance_scale)) * stop
    pipe.transformer.requires_grad_(True)
    policy = count_flops(lambda: predict_velocity(pipe.transformer, latents, schedule.timesteps[stop], text, 1.0).sum().backward())
    pipe.transformer.requires_grad_(False)
    policy_weights = {t.data_ptr() for t in pipe.transformer.parameters()}
    own_weights = {"dina": [t for t in built["dina"].scorer.model.parameters() if t.data_ptr() not in policy_weights],
                   "pixel": list(load_pixel_reward(rewards["pixel"]).parameters())}
    costs = {}
    for kind, reward in built.items():
        clean = latents.clone().requires_grad_(True)
        with SavedActivations() as saved, FlopCounterMode(display=False) as forward_mode:
            scores = reward(clean, prompts, seed=0)
        with FlopCounterMode(display=False) as backward_mode:
            scores.sum().backward()
        costs[kind] = {"reward_forward": forward_mode.get_total_flops() / batch,
                       "update": (backward_mode.get_total_flops() + policy) / batch,
                       "sampling": sampling / batch,
                       "memory_mib": (sum(t.numel() * t.element_size() for t in own_weights[kind]) + saved.bytes) / 2**20}
    return costs


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct tensors autograd keeps for the backward while active."""

    def __init__(self):
        self.sizes: dict[int, int] = {}
        super().__init__(self.pack, lambda tensor: tensor)

    def __enter__(self) -> SavedActivations:
        super().__enter__()
        return self

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sizes.setdefault(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def summarise(seeds: list[dict]) -> dict:
    """One run's seeds: test judge of the base and of the kept checkpoint, the gain with a bootstrap
    interval over test prompts (all seeds of a prompt together), per clause, and the per-step costs."""
    tests = [run["summary"]["test"] for run in seeds]
    gains = [b - a for test in tests for a, b in zip(test["base"]["judge"], test["best"]["judge"])]
    groups = [i for test in tests for i in range(len(test["base"]["judge"]))]
    steps = [r for run in seeds for r in run["history"] if "reward_mean" in r]
    clauses = {}
    for kind in CLAUSES:
        base = [v for test in tests for v in test["base"].get(f"judge/{kind}", []) if v is not None]
        best = [v for test in tests for v in test["best"].get(f"judge/{kind}", []) if v is not None]
        if base:
            clauses[kind] = {"base": float(np.mean(base)), "best": float(np.mean(best))}
    return {
        "seeds": [run["seed"] for run in seeds],
        "test_judge_base": float(np.mean([np.mean(test["base"]["judge"]) for test in tests])),
        "test_judge_best": float(np.mean([np.mean(test["best"]["judge"]) for test in tests])),
        "test_judge_final": float(np.mean([np.mean(test["final"]["judge"]) for test in tests])),
        "test_gain": float(np.mean(gains)),
        "test_gain_ci": list(bootstrap_interval(gains, groups)),
        "test_gain_per_seed": [float(np.mean(test["best"]["judge"]) - np.mean(test["base"]["judge"])) for test in tests],
        "best_steps": [run["summary"]["best"]["step"] for run in seeds],
        "divergence_steps": [run["summary"]["divergence_step"] for run in seeds],
        "clauses": clauses,
        "steps": int(np.mean([run["summary"]["steps"] for run in seeds])),
        "cpu_seconds": float(np.mean([run["summary"]["train_cpu_seconds"] for run in seeds])),
        "cpu_s_per_step": float(np.mean([run["summary"]["train_cpu_seconds"] / run["summary"]["steps"] for run in seeds])),
        "reward_ms_per_sample": 1000 * sum(r["time_reward_s"] for r in steps) / sum(r["samples"] for r in steps),
        "sampling_s_per_step": float(np.mean([r["time_sampling_s"] for r in steps])),
        "update_s_per_step": float(np.mean([r["time_update_s"] for r in steps])),
        "peak_memory_mib": float(max(r["peak_memory_mib"] for r in steps)),
    }
