"""``dina-lrm toyworld align`` (``make demo-align``): the paper's alignment experiment in the toy world.

1. **The base policy**: the shipped good generator after a short fine-tune that installed systematic,
   learnable failures (``pretrained_biased``: half of the object groups drawn in a confusion colour
   under the unchanged caption, so it often draws the wrong colour but knows the right one), as real
   base models' biases are. Its gate, before any RL: fine-tuning on ground-truth renders of the training
   prompts within the alignment budget lifts it (``SFT on renders``), and DiffusionNFT with every
   reward equal (r = 1/2) leaves it where it is (``NFT + constant reward``). ``base: early`` runs the
   experiment on the early generator of the previous experiment instead.
2. **The rewards**, trained for a fixed number of steps on preference pairs of the base's own samples and
   corrupted renders: DiNa-LRM on the base's transformer (so under ReFL it shares the policy's frozen
   weights, as the paper's SD3.5-M reward does) and the pixel reward that must decode.
3. **The runs**, each for a fixed number of steps and seeds: DiffusionNFT with the judge (the loop's
   check), DiNa-LRM and the pixel reward; ReFL with DiNa-LRM (the paper's method); optionally Flow-GRPO.
   The judge scores validation prompts every few steps and picks the checkpoint to keep; test prompts,
   disjoint from the training and validation prompts, score the base and the kept checkpoint. Everything
   samples without classifier-free guidance, as DiffusionNFT does.
4. **The report**: judge gain on the test prompts with a bootstrap interval over prompts (all seeds),
   per clause before and after, validation judge against training CPU-seconds, the cost per step
   (time, FLOPs, peak memory) beside the paper's table, and sample grids.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModelWithProjection

from dina_lrm import (
    AlignConfig,
    Aligner,
    PairRecord,
    RewardSpec,
    SD3PromptEncoder,
    bootstrap_interval,
    build_reward,
    count_flops,
    load_pipeline,
    load_preference_shards,
    policy_for,
    write_preference_shards,
)
from dina_lrm_toyworld.alignment_report import write_alignment_report
from dina_lrm_toyworld.config import BIASED_BASE_RECIPE, GATE, RUNS, DemoConfig, PretrainConfig, ToyAlignmentConfig
from dina_lrm_toyworld.corruptions import corrupt_scene
from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, build_preference_data, subset, train_dina, train_pixel
from dina_lrm_toyworld.generator import T5_TOKENS, encode_latents, images_to_tensor
from dina_lrm_toyworld.pairs import PairBatches
from dina_lrm_toyworld.rewards import CLAUSES, load_pixel_reward, save_pixel_reward
from dina_lrm_toyworld.scenes import parse_prompt, render, sample_prompts, scene_for

BASES = {"biased": Path(__file__).parent / "pretrained_biased", "early": Path(__file__).parent / "pretrained_early"}
JUDGE = RewardSpec(kind="python", target="dina_lrm_toyworld.rewards:judge", name="judge")
CONSTANT = RewardSpec(kind="python", target="dina_lrm_toyworld.rewards:constant", name="constant")
COMMON = dict(prompts_per_step=8, guidance_scale=1.0, eval_every=5)
NFT = dict(max_steps=30, learning_rate=2e-3, ema_decay=0.9, lora_rank=8, lora_alpha=16,
           nft={"group_size": 8, "beta": 0.3, "global_std": True, "timestep_fraction": 0.4, "kl_coef": 0.0, "updates_per_step": 8})
SFT = dict(max_steps=30, learning_rate=2e-3, ema_decay=0.9, sft={"batch_size": 64, "noise_draws": 4, "updates_per_step": 8})
REFL = dict(max_steps=30, train_sampling_steps=12, learning_rate=1e-3, early_stop_patience=3, refl={"stop_range": [6, 12]})
GRPO = dict(max_steps=30, learning_rate=3e-4, grpo={"group_size": 8, "noise_level": 0.7, "sde_window_size": 3, "sde_window_range": [0, 6],
                                                   "global_std": True, "clip_range": 0.2, "updates_per_step": 2})
SETTINGS = {"nft": NFT, "sft": SFT, "refl": REFL, "grpo": GRPO}


def biased_base_recipe(**overrides) -> PretrainConfig:
    """The biased base's recipe: the shipped generator continued on renders that draw half of the
    object groups in their confusion colour."""
    return PretrainConfig(generator_from=str(SHIPPED_GENERATOR), **{**BIASED_BASE_RECIPE, **overrides})


def materialise_base(out: Path, base: str) -> Path:
    """The base as a full pipeline directory: the shipped VAE, tokenizers and scheduler with the chosen
    checkpoint's transformer and, where it has its own, text encoders (or a toy pipeline directory as it is)."""
    if base not in BASES:
        if not (Path(base) / "model_index.json").is_file():
            raise FileNotFoundError(f"base {base!r} is neither one of {sorted(BASES)} nor a toy pipeline directory")
        return Path(base)
    directory = out / "base_generator"
    if (directory / "model_index.json").is_file():
        return directory
    pipe = load_pipeline(SHIPPED_GENERATOR)
    pipe.transformer = SD3Transformer2DModel.from_pretrained(str(BASES[base] / "transformer"), torch_dtype=torch.float32)
    for name in ("text_encoder", "text_encoder_2"):
        if (BASES[base] / name).is_dir():
            setattr(pipe, name, CLIPTextModelWithProjection.from_pretrained(str(BASES[base] / name), torch_dtype=torch.float32))
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


@torch.no_grad()
def write_render_shards(out: Path, vae, prompts: list[str], per_prompt: int, seed: int = 0) -> Path:
    """Ground-truth renders of ``prompts`` as preference shards (chosen: a render; rejected: the same
    scene with one object's colour changed), the data of the SFT gate."""
    rng = np.random.default_rng(seed)
    chosen, rejected, texts = [], [], []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        for _ in range(per_prompt):
            scene = scene_for(spec, rng)
            chosen.append(render(scene))
            rejected.append(render(corrupt_scene(spec, scene, "colour", rng)))
            texts.append(prompt)
    latents = encode_latents(vae, images_to_tensor(chosen + rejected))
    records = [PairRecord(prompt=text, chosen=latents[i].numpy(), rejected=latents[len(texts) + i].numpy(), pair_id=f"render{i}",
                          group_id=text, source="render", chosen_id=f"render{i}", rejected_id=f"colour{i}")
               for i, text in enumerate(texts)]
    write_preference_shards(out, records, metadata={"world": "toy", "kind": "ground-truth renders"})
    return out


def train_rewards(out: Path, base_dir: Path, config: ToyAlignmentConfig) -> dict:
    """Preference pairs of the base generator's samples, then DiNa-LRM and the pixel reward (in parallel
    workers), ``reward_steps`` steps each; returns their paths and held-out accuracies."""
    pipe = load_pipeline(base_dir)
    data = build_preference_data(pipe, SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS), config.data, out / "shards")
    (dina, dina_accuracy), (pixel, pixel_accuracy) = in_workers(train_reward, [(kind, out, base_dir, config) for kind in ("dina", "pixel")],
                                                                 config.workers)
    return {
        "dina": dina, "pixel": pixel,
        "heldout_accuracy": {"DiNa-LRM": dina_accuracy, "pixel reward": pixel_accuracy},
        "pairs": {"train": data["train"]["pairs"], "test": data["test"]["pairs"]},
        "base_judge_on_train_prompts": data["train"]["generator_judge_score"],
    }


def train_reward(kind: str, out: Path, base_dir: Path, config: ToyAlignmentConfig) -> tuple[str, float]:
    """DiNa-LRM (``dina``) or the pixel reward on the shards under ``out``: its saved path and held-out accuracy."""
    pipe = load_pipeline(base_dir)
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    train_pairs, test_pairs = load_preference_shards(out / "shards" / "train"), load_preference_shards(out / "shards" / "test")
    monitor = subset(test_pairs, range(min(256, len(test_pairs))))
    demo = DemoConfig(steps=config.reward_steps, batch_size=config.reward_batch_size, learning_rate=config.reward_learning_rate)
    batches = PairBatches(train_pairs, prompt_encoder, demo.batch_size, demo.seed)
    if kind == "dina":
        model, history = train_dina(pipe, prompt_encoder, "thurstone", batches, monitor, demo, "DiNa-LRM")
        return str(model.save_pretrained(out / "reward_model")), history[-1]["heldout_accuracy"]
    model, history = train_pixel(pipe, prompt_encoder, batches, monitor, demo, config.pixel_reward_steps)
    return str(save_pixel_reward(model, out / "pixel_reward.safetensors")), history[-1]["heldout_accuracy"]


def earlier_rewards(config: ToyAlignmentConfig) -> dict:
    """The rewards (and render shards) of the experiment in ``config.rewards_from``, which must share the base."""
    record = Path(config.rewards_from) / "alignment.json"
    if not record.is_file():
        raise FileNotFoundError(f"no finished alignment experiment in {config.rewards_from} (no alignment.json)")
    earlier = json.loads(record.read_text())
    if earlier["config"]["base"] != config.base:
        raise ValueError(f"{config.rewards_from} aligned the {earlier['config']['base']} base, not {config.base}: its rewards were trained on another generator")
    return earlier["rewards"]


def reward_spec(kind: str, rewards: dict, base_dir: Path) -> RewardSpec:
    if kind == "dina":
        return RewardSpec(kind="dina", path=rewards["dina"], u=0.4, name="DiNa-LRM")
    if kind == "pixel":
        return RewardSpec(kind="python", target="dina_lrm_toyworld.rewards:pixel_reward", name="pixel reward", differentiable=True,
                          kwargs={"path": rewards["pixel"], "generator": str(base_dir)})
    return CONSTANT if kind == "constant" else JUDGE


def align_config(name: str, seed: int, rewards: dict, base_dir: Path, prompts: dict[str, Path], out: Path,
                 config: ToyAlignmentConfig) -> AlignConfig:
    method, kind = RUNS[name]
    settings = merged(SETTINGS[method], config.settings.get(method, {}))
    if method == "sft":
        settings["sft"] = {**settings["sft"], "data": rewards["renders"]}
    raw = {
        "method": method, "generator": str(base_dir), "reward": asdict(reward_spec(kind, rewards, base_dir)), "judge": asdict(JUDGE),
        "prompts": str(prompts["train"]), "eval_prompts": str(prompts["val"]), "num_eval_prompts": config.num_val_prompts,
        "test_prompts": str(prompts["test"]), "num_test_prompts": config.num_test_prompts, "out": str(out), "seed": seed,
        "eval_sampling_steps": config.eval_sampling_steps, "checkpoint_every": 10**9, "max_sequence_length": T5_TOKENS,
    }
    return AlignConfig.from_dict(merged(raw, merged(COMMON, settings)))


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides``; nested sections (``nft: {...}``) are merged key by key."""
    result = dict(base)
    for key, value in overrides.items():
        result[key] = {**result[key], **value} if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' + ', '_').replace(' ', '_').lower()}_seed{seed}"


def run_alignment_experiment(out: str | Path, config: ToyAlignmentConfig | None = None, overwrite: bool = False) -> dict:
    """Everything above; writes ``alignment.md``, ``alignment.json`` and plots under ``out``. Refuses an
    ``out`` that holds an earlier experiment unless ``overwrite``."""
    config = config or ToyAlignmentConfig()
    unknown = [name for name in config.runs if name not in RUNS]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose among {list(RUNS)}")
    out = Path(out)
    if (out / "alignment.json").exists() or (out / "runs").exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds an earlier alignment experiment; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    base_dir = materialise_base(out, config.base)
    prompts = write_prompt_sets(out, config)
    rewards = earlier_rewards(config) if config.rewards_from else train_rewards(out, base_dir, config)
    if "renders" not in rewards:
        rewards["renders"] = str(write_render_shards(out / "renders", load_pipeline(base_dir).vae, prompts["train"].read_text().split("\n")[:-1],
                                                     config.renders_per_prompt))
    jobs = [(name, seed, align_config(name, seed, rewards, base_dir, prompts, run_dir(out, name, seed), config))
            for name in config.runs for seed in (config.seeds[:1] if name in GATE else config.seeds)]
    # the costliest runs first, so that the cheap ones fill the workers at the end
    order = sorted(range(len(jobs)), key=lambda i: RUN_COST[RUNS[jobs[i][0]]], reverse=True)
    finished = dict(zip(order, in_workers(run_one, [(jobs[i][2],) for i in order], config.workers)))
    runs: dict[str, list[dict]] = {}
    for i, (name, seed, _) in enumerate(jobs):
        history, summary = finished[i]
        runs.setdefault(name, []).append({"seed": seed, "history": history, "summary": summary})
    result = {"config": {**asdict(config), "defaults": SETTINGS, "common": COMMON}, "rewards": rewards,
              "flops": reward_costs(rewards, base_dir, config),
              "runs": {name: summarise(seeds) for name, seeds in runs.items()},
              "histories": {name: [s["history"] for s in seeds] for name, seeds in runs.items()}}
    write_alignment_report(out, result, {name: run_dir(out, name, config.seeds[0]) for name in config.runs})
    (out / "alignment.json").write_text(json.dumps(result, indent=1))
    return result


RUN_COST = {("grpo", "judge"): 5, ("nft", "judge"): 4, ("nft", "pixel"): 4, ("nft", "dina"): 3, ("nft", "constant"): 2,
            ("sft", "renders"): 1, ("refl", "dina"): 1}  # relative cost, for the order the workers take the runs in


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
    policy = policy_for(pipe, T5_TOKENS)
    prompts = [spec.text for spec in sample_prompts(batch, "train", 7)]
    text = policy.encode(prompts)
    latents = torch.randn((batch, *policy.latent_shape(None)), generator=torch.Generator().manual_seed(0))
    refl = merged(REFL, config.settings.get("refl", {}))
    schedule = policy.schedule(refl["train_sampling_steps"], latents.shape[1:])
    stop = sum(refl["refl"]["stop_range"]) // 2
    guidance = COMMON["guidance_scale"]
    sampling = count_flops(lambda: policy.velocity(pipe.transformer, latents, float(schedule.sigmas[0]), text, guidance)) * stop
    pipe.transformer.requires_grad_(True)
    step = count_flops(lambda: policy.velocity(pipe.transformer, latents, float(schedule.sigmas[stop]), text, 1.0).sum().backward())
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
                       "update": (backward_mode.get_total_flops() + step) / batch,
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
    final_gains = [b - a for test in tests for a, b in zip(test["base"]["judge"], test["final"]["judge"])]
    groups = [i for test in tests for i in range(len(test["base"]["judge"]))]
    steps = [r for run in seeds for r in run["history"] if "samples" in r]
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
        "test_final_gain": float(np.mean(final_gains)),
        "test_final_gain_ci": list(bootstrap_interval(final_gains, groups)),
        "best_steps": [run["summary"]["best"]["step"] for run in seeds],
        "divergence_steps": [run["summary"]["divergence_step"] for run in seeds],
        "clauses": clauses,
        "steps": int(np.mean([run["summary"]["steps"] for run in seeds])),
        "cpu_seconds": float(np.mean([run["summary"]["train_cpu_seconds"] for run in seeds])),
        "cpu_s_per_step": float(np.mean([run["summary"]["train_cpu_seconds"] / run["summary"]["steps"] for run in seeds])),
        "reward_ms_per_sample": 1000 * sum(r.get("time_reward_s", 0.0) for r in steps) / sum(r["samples"] for r in steps),
        "sampling_s_per_step": float(np.mean([r.get("time_sampling_s", 0.0) for r in steps])),
        "update_s_per_step": float(np.mean([r["time_update_s"] for r in steps])),
        "peak_memory_mib": float(max(r["peak_memory_mib"] for r in steps)),
    }
