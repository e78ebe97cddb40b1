"""Reward-guided sampling: search during denoising, pruning candidates on their noisy latents.

A DiNa-LRM was trained on latents noised to level sigma, so it scores a sample mid-trajectory, on its
own noisy latent x_t, in distribution: no decode, no x0 prediction. Strategies, for any generator with
a policy adapter (SD3 / SD3.5, FLUX.1, Z-Image, Qwen-Image: ``models/*_policy.py``) and a DiNa-LRM of
the same backbone:

* ``best_of_n``: N samples, scored once at the end on their clean latents; the best is returned;
* ``prune`` (prune-and-continue): N candidates are scored at checkpoints sigma_1 > sigma_2 > ...
  on the latent as it is at that sigma (no extra noise, the timestep of that sigma); each checkpoint
  keeps a share (geometric from N down to ``keep``), and only the survivors spend further steps;
* ``beam``: as ``prune``, but each checkpoint refills the N slots with copies of its survivors, which
  continue with fresh SDE noise so that the copies diverge.

The final choice among the survivors is made by ``final_reward`` (by default the DiNa-LRM on the
clean latents at u = 0.4). :func:`search` counts the transformer calls it makes, per candidate step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from dina_lrm.align.reward_spec import weight_sharing_copy
from dina_lrm.rewards import Reward
from dina_lrm.align.sampling import initial_noise, noisy_step
from dina_lrm.data.images import vae_decode
from dina_lrm.models.backbones import backbone_name, policy_for
from dina_lrm.models.policy import TextConditioning
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.scorer import Scorer
from dina_lrm.search_config import SearchConfig



@dataclass
class PromptSearch:
    prompt: str
    latents: torch.Tensor  # (C, h, w) the returned sample
    chosen: int  # its candidate number
    scores: dict[str, dict[str, list]]  # "sigma=0.60" / "final" -> {"candidates": [...], "scores": [...]} (beam copies repeat a number)
    survivors: list[int]  # the candidates that reached the end
    final_latents: torch.Tensor  # (S, C, h, w) theirs, in the order of scores["final"]
    pruned: list[tuple[int, float, torch.Tensor]]  # (candidate, sigma, its latent there) of each pruned candidate
    transformer_calls: int  # candidate steps through the generator's transformer
    checkpoint_scores: int  # candidates scored on a noisy latent


class Searcher:
    """Runs a :class:`SearchConfig` with ``pipe`` (a generator with a policy adapter) and ``scorer`` (a DiNa-LRM
    of the same generator; it scores the checkpoints and, unless ``final_reward`` (an alignment reward:
    ``reward(latents, prompts, seed)``) is given, the end)."""

    def __init__(self, pipe, scorer: Scorer, config: SearchConfig, final_reward: Reward | None = None):
        config.validate()
        if any("lora_" in name for name, _ in pipe.transformer.named_parameters()):
            raise ValueError("the pipeline's transformer carries LoRA layers (a reward built on it?): the generator would sample "
                             "with them; build the reward with Searcher.from_pretrained, on a weight-sharing copy")
        generator, reward = backbone_name(pipe.transformer), scorer.model.backbone_name
        if reward != generator:
            raise ValueError(f"the reward is built on the {reward} backbone but the pipeline is {generator}: use a reward of this generator")
        self.pipe, self.scorer, self.config = pipe, scorer, config
        self.final_reward = final_reward
        self.policy = policy_for(pipe, config.max_sequence_length)
        self.latent_shape = self.policy.latent_shape(config.resolution)
        self.schedule = self.policy.schedule(config.steps, self.latent_shape)
        self.guidance = self.policy.default_guidance if config.guidance_scale is None else config.guidance_scale
        self.checkpoints = self._checkpoint_steps()

    @classmethod
    def from_pretrained(cls, reward_dir, pipe, config: SearchConfig, final_reward: Reward | None = None) -> Searcher:
        """The DiNa-LRM of ``reward_dir`` on a weight-sharing copy of ``pipe``'s transformer (its LoRA
        never reaches the generator; the weights exist once)."""
        model = DiNaLRM.from_pretrained(reward_dir, weight_sharing_copy(pipe.transformer))
        return cls(pipe, Scorer.from_model(model, pipe), config, final_reward)

    def _checkpoint_steps(self) -> dict[int, int]:
        """Step index -> checkpoint number: the first step whose sigma is at or below each checkpoint's."""
        if self.config.strategy == "best_of_n":
            return {}
        steps = {}
        for number, sigma in enumerate(self.config.at):
            index = int(torch.nonzero(self.schedule.sigmas[:-1] <= sigma)[0]) if (self.schedule.sigmas[:-1] <= sigma).any() else None
            if index is None or index in steps:
                raise ValueError(f"checkpoint sigma {sigma} falls on no step of its own in a {self.config.steps}-step schedule")
            steps[index] = number
        return steps

    def _conditioning(self, prompt: str, count: int) -> TextConditioning:
        return self.policy.encode([prompt], self.config.negative_prompt).repeat(count)

    @torch.no_grad()
    def noisy_scores(self, latents: torch.Tensor, prompt: str, step: int) -> torch.Tensor:
        """DiNa-LRM scores of ``latents`` as they are after ``step`` steps, at that step's timestep."""
        model = self.scorer.model
        states, pooled = self.scorer.prompt_encoder([prompt] * len(latents))
        timestep = self.schedule.timesteps[step].to(model.device).expand(len(latents))
        return model(latents.to(model.device, model.dtype), states.to(model.device, model.dtype), pooled.to(model.device, model.dtype),
                     timestep)[:, 0].float().cpu()

    @torch.no_grad()
    def run(self, prompt: str, seed: int | None = None, progress: bool = False) -> PromptSearch:
        config, schedule = self.config, self.schedule
        generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
        transformer = self.pipe.transformer
        device = next(transformer.parameters()).device
        x = initial_noise(config.n, self.latent_shape, generator, device)
        candidates = list(range(config.n))
        text = self._conditioning(prompt, config.n)
        scores: dict[str, dict[str, list]] = {}
        pruned: list[tuple[int, float, torch.Tensor]] = []
        calls = scored = 0
        beam_noise = 0.0
        for step in tqdm(range(schedule.num_steps), desc=prompt[:40], disable=not progress, leave=False):
            if step in self.checkpoints:
                noisy = self.noisy_scores(x, prompt, step)
                scored += len(x)
                scores[f"sigma={float(schedule.sigmas[step]):.2f}"] = {"candidates": list(candidates), "scores": noisy.tolist()}
                before = dict(zip(candidates, x))
                x, candidates = self._select(x, candidates, noisy, config.survivors()[self.checkpoints[step]])
                pruned += [(c, float(schedule.sigmas[step]), latent.cpu()) for c, latent in before.items() if c not in candidates]
                text = self._conditioning(prompt, len(x))
                beam_noise = config.beam_noise_level if config.strategy == "beam" else 0.0
            velocity = self.policy.velocity(transformer, x, float(schedule.sigmas[step]), text, self.guidance)
            x = noisy_step(schedule, step, x, velocity, beam_noise, generator=generator).sample
            calls += len(x)
        final = self.final_scores(x, candidates, prompt, config.seed if seed is None else seed)
        scores["final"] = {"candidates": list(candidates), "scores": final.tolist()}
        best = int(final.argmax())
        return PromptSearch(prompt, x[best].cpu(), candidates[best], scores, sorted(set(candidates)), x.cpu(), pruned, calls, scored)

    def final_scores(self, latents: torch.Tensor, candidates: list[int], prompt: str, seed: int) -> torch.Tensor:
        """The end scores: ``final_reward``'s, or the DiNa-LRM's at ``final_u`` with each candidate's noise
        seeded by its number (a candidate scores the same whoever else survived)."""
        if self.final_reward is not None:
            return self.final_reward(latents, [prompt] * len(latents), seed=seed).float().cpu()
        seeds = [seed * 100_003 + candidate for candidate in candidates]
        return self.scorer.score([prompt] * len(latents), latents=latents, u=self.config.final_u, seeds=seeds).raw.float().cpu()

    def _select(self, x: torch.Tensor, candidates: list[int], scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, list[int]]:
        """Prune to the ``keep`` best (kept in candidate order; nothing changes when all are kept);
        for beam, refill the slots with copies of the survivors."""
        if keep >= len(candidates):
            survivors = list(range(len(candidates)))
        else:
            survivors = sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())
        if self.config.strategy == "beam":
            copies = math.ceil(self.config.n / len(survivors))
            survivors = [i for i in survivors for _ in range(copies)][: self.config.n]
        return x[survivors], [candidates[i] for i in survivors]


KEPT, PRUNED, CHOSEN = (40, 160, 60), (200, 50, 50), (230, 180, 20)


def _tile(image: torch.Tensor, colour: tuple[int, int, int], label: str, border: int = 3) -> Image.Image:
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(pixels)
    if picture.width < 128:  # small (toy) images: enlarge so that the label fits under them
        picture = picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST)
    tile = ImageOps.expand(picture, border=border, fill=colour)
    canvas = Image.new("RGB", (tile.width, tile.height + 14), "white")
    canvas.paste(tile, (0, 0))
    ImageDraw.Draw(canvas).text((2, tile.height + 1), label, fill=(0, 0, 0))
    return canvas


def contact_sheet(results: list[PromptSearch], vae) -> Image.Image:
    """One row per prompt: the pruned candidates as they were when pruned (red, with sigma and score),
    the survivors' final images (green, final score) and the returned one (gold)."""
    rows = []
    for result in results:
        tiles = []
        for candidate, sigma, latent in result.pruned:
            score = _score_at(result, sigma, candidate)
            tiles.append(_tile(vae_decode(vae, latent[None])[0], PRUNED, f"#{candidate} s{sigma:.2f} {score:.2f}"))
        final = result.scores["final"]
        images = vae_decode(vae, result.final_latents)
        for slot, (candidate, score) in enumerate(zip(final["candidates"], final["scores"])):
            colour = CHOSEN if slot == int(torch.tensor(final["scores"]).argmax()) else KEPT
            tiles.append(_tile(images[slot], colour, f"#{candidate} {score:.2f}"))
        rows.append(tiles)
    width = max(sum(t.width for t in row) for row in rows)
    height = sum(max(t.height for t in row) for row in rows)
    sheet = Image.new("RGB", (width, height), "white")
    top = 0
    for row in rows:
        left = 0
        for tile in row:
            sheet.paste(tile, (left, top))
            left += tile.width
        top += max(t.height for t in row)
    return sheet


def _score_at(result: PromptSearch, sigma: float, candidate: int) -> float:
    checkpoint = result.scores[f"sigma={sigma:.2f}"]
    return checkpoint["scores"][checkpoint["candidates"].index(candidate)]


def write_results(results: list[PromptSearch], vae, out: Path, config: SearchConfig) -> list[Path]:
    """``out``: one PNG per prompt (the returned sample), ``search.json`` (every candidate's scores at
    each checkpoint and at the end, the survivors, the transformer calls) and ``contact_sheet.png``."""
    images = vae_decode(vae, torch.stack([r.latents for r in results]))
    paths = []
    for number, (result, image) in enumerate(zip(results, images)):
        slug = re.sub(r"[^a-z0-9]+", "_", result.prompt.lower()).strip("_")[:60]
        paths.append(out / f"{number:03d}_{slug}.png")
        Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(paths[-1])
    record = {"config": asdict(config), "prompts": [
        {"prompt": r.prompt, "image": p.name, "chosen": r.chosen, "survivors": r.survivors, "scores": r.scores,
         "pruned": [{"candidate": c, "sigma": s} for c, s, _ in r.pruned], "transformer_calls": r.transformer_calls,
         "checkpoint_scores": r.checkpoint_scores} for r, p in zip(results, paths)]}
    (out / "search.json").write_text(json.dumps(record, indent=1))
    contact_sheet(results, vae).save(out / "contact_sheet.png")
    return paths
