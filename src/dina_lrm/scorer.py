"""The one-line user API: ``Scorer.from_pretrained(reward_dir, model_id).score(prompts, images=...)``."""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from dina_lrm.config import AUTOCAST_NAMES, TEXT_ENCODER_MODES, load_config
from dina_lrm.data.images import center_crop_to_multiple, load_images, vae_encode, vae_scale_factor
from dina_lrm.losses import pair_probability, thurstone_variance
from dina_lrm.models.backbones import prompt_encoder_for
from dina_lrm.models.checkpoint import CONFIG_NAME, open_directory
from dina_lrm.models.prompt_cache import CachedPromptEncoder, padded_with_mask
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.noise import SigmaTable, add_noise, default_u
from dina_lrm.pipelines import load_kept_transformer, load_pipeline

SCORE_OFFSET, SCORE_SCALE = 10.0, 10.0
VAE_BATCH = 16  # images per VAE encoder pass
AUTOCAST = dict(zip(AUTOCAST_NAMES, (torch.bfloat16, torch.float16)))  # the backbone's half precision; the head keeps its own
# What a scorer without text encoders leaves out of its pipeline (FLUX and the others have a subset).
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def normalize_score(raw: torch.Tensor) -> torch.Tensor:
    """The scale users read: ``(raw + 10) / 10``."""
    return (raw + SCORE_OFFSET) / SCORE_SCALE


@runtime_checkable
class LatentRewardModel(Protocol):
    """What a :class:`Scorer` calls on its model. :class:`DiNaLRM` is one; another latent reward model
    (e.g. one built around a DiNaLRM's backbone with its own head) scores through a Scorer by
    providing these."""

    config: object  # a DiNaConfig: the loss (model.model_type), training.add_noise, the trained T5 length
    base_backbone: torch.nn.Module  # patch_size, pooled_width

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def check_latents(self, latents: torch.Tensor) -> None: ...

    def forward_ensemble(self, latents, encoder_hidden_states, pooled_projections, timesteps,
                         max_batch_items: int | None = None) -> torch.Tensor: ...

    def enable_autocast(self, dtype: torch.dtype | None) -> None: ...

    def compile_blocks(self, **options) -> None: ...


def check_reward_model(model) -> None:
    """A one-line error when ``model`` lacks what a Scorer calls (checked once, not at the first score)."""
    if not isinstance(model, LatentRewardModel):
        missing = [name for name in ("config", "base_backbone", "device", "dtype", "check_latents", "forward_ensemble",
                                     "enable_autocast", "compile_blocks") if not hasattr(model, name)]
        raise TypeError(f"{type(model).__name__} is not a latent reward model a Scorer can call: it lacks {missing}")
    if "max_batch_items" not in inspect.signature(model.forward_ensemble).parameters:
        raise TypeError(f"{type(model).__name__}.forward_ensemble must take max_batch_items (see DiNaLRM.forward_ensemble)")


def load_reward_pipeline(reward_dir: Path, model_id_or_dir: str | Path, dtype: torch.dtype, text_encoders: bool = True):
    """The generator's pipeline as a reward in ``reward_dir`` needs it: its transformer holding only the
    modules the reward keeps (:func:`~dina_lrm.pipelines.load_kept_transformer`), the VAE and scheduler,
    and the text encoders unless ``text_encoders`` is False. Nothing is moved: it loads on the CPU."""
    config = load_config(Path(reward_dir) / CONFIG_NAME)
    pipe = load_pipeline(model_id_or_dir, dtype, skip=("transformer",) + (() if text_encoders else TEXT_COMPONENTS))
    pipe.register_modules(transformer=load_kept_transformer(model_id_or_dir, partial(DiNaLRM.kept_modules, config), dtype))
    return pipe


class NonFiniteScoreError(FloatingPointError):
    """The reward model returned NaN or inf for finite inputs: latents far outside the VAE's range, or a
    dtype too narrow for them (a loaded checkpoint's weights are checked finite at load)."""


@dataclass
class ScoreResult:
    raw: torch.Tensor  # (B,) the head's output, averaged over noise draws
    normalized: torch.Tensor  # (B,) (raw + 10) / 10
    sigmas: torch.Tensor  # (K,) the noise levels actually used (snapped to the sigma table)
    thurstone_std: torch.Tensor  # (K,) utility noise std sqrt(2 sigma^2 + 0.05) the loss assumes at each level

    def rows(self) -> list[dict]:
        return [{"raw": float(r), "normalized": float(n)} for r, n in zip(self.raw, self.normalized)]


class Scorer:
    """Scores prompts with images or latents.

    Images are VAE-encoded with the generator's own VAE and latent normalisation. Each score
    noises the latent to level u (one draw by default); ``noise_levels`` ensembles several
    levels as the head's multi-level ensemble, ``n_draws`` averages independent noise draws,
    and every level and draw runs through the backbone as one batch.
    """

    def __init__(self, model: LatentRewardModel, prompt_encoder: CachedPromptEncoder | None, sigma_table: SigmaTable, vae=None,
                 max_batch_items: int | None = None):
        check_reward_model(model)
        self.model = model.eval()
        self.prompt_encoder = prompt_encoder
        self.sigma_table = sigma_table
        self.vae = vae
        self.max_batch_items = max_batch_items  # latents per backbone pass of an ensemble (DiNaLRM.forward_ensemble)

    @classmethod
    def from_model(cls, model: DiNaLRM, pipe, max_sequence_length: int | None = None, max_batch_items: int | None = None,
                   text_encoders: bool = True) -> Scorer:
        """A scorer around an in-memory model, with ``pipe``'s text encoders, VAE and sigma table.
        ``max_sequence_length``: T5 tokens; by default the number the model was trained with.
        ``max_batch_items``: see :meth:`DiNaLRM.forward_ensemble` (default: one level's batch per pass).
        ``text_encoders=False``: no prompt encoder; the caller passes prompt embeddings."""
        encoder = None
        if text_encoders:
            length = text_length(model, max_sequence_length)
            encoder = prompt_encoder_for(pipe.transformer).from_pipeline(pipe, max_sequence_length=length)
        return cls(model, encoder, SigmaTable.from_scheduler(pipe.scheduler), vae=pipe.vae, max_batch_items=max_batch_items)

    @classmethod
    def from_pipeline(cls, reward_dir: str | Path, pipe, max_sequence_length: int | None = None,
                      max_batch_items: int | None = None, text_encoders: bool = True) -> Scorer:
        return cls.from_model(DiNaLRM.from_pretrained(reward_dir, pipe.transformer), pipe, max_sequence_length, max_batch_items,
                              text_encoders)

    @classmethod
    def from_pretrained(
        cls,
        reward_dir: str | Path,
        pipeline_or_model_id,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int | None = None,
        max_batch_items: int | None = None,
        autocast: str | None = None,
        compile: bool = False,
        text_encoders: str = "device",
    ) -> Scorer:
        """``pipeline_or_model_id``: a local pipeline directory or a hub id, from which only what the reward
        keeps is loaded (the transformer's embeddings and first blocks, the VAE, the text encoders as
        ``text_encoders`` says); or a loaded diffusers pipeline, whose modules the reward shares
        (docs/scoring.md says what stays shared and how to free the rest).
        ``text_encoders``: ``device`` (on ``device``), ``cpu`` (kept on the CPU: prompts encode there, the
        embeddings move), or ``none`` (not loaded: callers pass prompt embeddings, as RL trainers and
        verl-omni's protocol do; a prompt is refused). They load in ``dtype``.
        ``autocast``: "bf16" or "fp16" runs the backbone in half precision, the head in ``dtype``;
        ``compile``: ``torch.compile`` the kept blocks (docs/performance.md measures both)."""
        if autocast is not None and autocast not in AUTOCAST:
            raise ValueError(f"unknown autocast {autocast!r}; choose one of {sorted(AUTOCAST)}")
        if text_encoders not in TEXT_ENCODER_MODES:
            raise ValueError(f"unknown text_encoders {text_encoders!r}; choose one of {TEXT_ENCODER_MODES}")
        reward_dir = open_directory(reward_dir, checksums=False)  # a wrong path fails before the generator loads
        pipe = pipeline_or_model_id
        if isinstance(pipe, (str, Path)):
            pipe = load_reward_pipeline(reward_dir, pipe, dtype, text_encoders != "none")
        model = DiNaLRM.from_pretrained(reward_dir, pipe.transformer).to(device)
        for name in ("vae", *(TEXT_COMPONENTS if text_encoders == "device" else ())):
            if isinstance(getattr(pipe, name, None), torch.nn.Module):
                getattr(pipe, name).to(device)
        scorer = cls.from_model(model, pipe, max_sequence_length, max_batch_items, text_encoders != "none")
        scorer.model.enable_autocast(AUTOCAST[autocast] if autocast else None)
        if compile:
            scorer.model.compile_blocks()
        return scorer

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x patch size)."""
        return vae_scale_factor(self.vae) * self.model.base_backbone.patch_size

    def encode_images(self, images) -> list[torch.Tensor]:
        """Normalised VAE latents (1, C, h, w) per image, center-cropped to a valid size; images of one
        size are encoded as one batch (at most ``VAE_BATCH`` at a time)."""
        if self.vae is None:
            raise ValueError("this scorer has no VAE: pass latents, or build it from a pipeline")
        cropped = [center_crop_to_multiple(image, self.latent_multiple) for image in load_images(images)]
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(cropped):
            by_size.setdefault(tuple(image.shape), []).append(i)
        latents: list[torch.Tensor | None] = [None] * len(cropped)
        for index in by_size.values():
            for start in range(0, len(index), VAE_BATCH):
                part = index[start:start + VAE_BATCH]
                encoded = vae_encode(self.vae, torch.stack([cropped[i] for i in part]))
                for i, latent in zip(part, encoded):
                    latents[i] = latent[None]
        return latents

    def score(
        self,
        prompts: str | list[str] | None = None,
        *,
        images=None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        u: float | None = None,
        noise_levels: list[float] | None = None,
        n_draws: int = 1,
        seed: int | None = None,
        seeds: list[int] | torch.Tensor | None = None,
        grad: bool = False,
        allow_nonfinite: bool = False,
    ) -> ScoreResult:
        """Score (prompt, image) pairs at noise level ``u``; by default ``noise.LATENT_U`` (0.4) for
        latents, a generator's own clean ones, and ``noise.IMAGE_U`` (0.1) for images.

        Text comes as ``prompts`` or as the pipeline's ``prompt_embeds`` + ``pooled_prompt_embeds`` (for
        Z-Image and Qwen-Image the text mask in its place; Z-Image's list of per-prompt embeddings and
        Qwen-Image's ``prompt_embeds_mask=None`` are accepted as their pipelines return them).
        ``seed`` seeds the whole call; ``seeds`` (one per item) seed each item's noise on its own, so
        an item scores the same whatever else is in the batch. ``grad=True`` keeps the graph from
        ``latents`` (or from image tensors, through the VAE encoder) to the scores.

        Raises :class:`NonFiniteScoreError` when a score is NaN or inf, unless ``allow_nonfinite`` (a
        server that batches several clients' items answers each client on its own).
        """
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of images= or latents=")
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        u = default_u("images" if images is not None else "latents") if u is None else u
        levels = torch.tensor(list(noise_levels) if noise_levels else [u], dtype=torch.float32)
        sigmas, timesteps = self.sigma_table.snap(levels)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with nullcontext() if grad else torch.no_grad():
            groups = self._latent_groups(images, latents)
            count = sum(len(index) for index, _ in groups)
            states, pooled = self._text_conditioning(prompts, prompt_embeds, pooled_prompt_embeds, count)
            seeds = _check_seeds(seeds, count)
            out_dtype = torch.float64 if self.model.dtype == torch.float64 else torch.float32
            raw = torch.empty(count, device=self.model.device, dtype=out_dtype)
            for index, group in groups:
                noise = self._draw_noise((n_draws, len(sigmas)) + tuple(group.shape[1:]), index, seeds, generator)
                raw[index] = self._score_latents(group, states[index], pooled[index], sigmas, timesteps, noise).to(out_dtype)
        if not allow_nonfinite and not torch.isfinite(raw.detach()).all():
            bad = (~torch.isfinite(raw.detach())).nonzero().flatten().tolist()
            raise NonFiniteScoreError(f"the reward model returned NaN or inf for item(s) {bad[:5]} of {count}, whose inputs are "
                                      f"finite: latents far outside the VAE's range, or {self.model.dtype} too narrow for them")
        return ScoreResult(raw=raw, normalized=normalize_score(raw), sigmas=sigmas, thurstone_std=thurstone_variance(sigmas).sqrt())

    def compare(self, prompts: str | list[str], *, images=None, latents=None, u: float | None = None, n_draws: int = 1,
                seed: int = 0) -> torch.Tensor:
        """P(a preferred over b) for each item, under the loss the model was trained with (Thurstone
        with its noise-dependent variance, constant-variance Thurstone, or Bradley-Terry).

        ``images=(a, b)`` (two lists of what :meth:`score` takes) or ``latents=(a, b)`` (two (B, C, H, W)
        tensors); item i of ``a`` and of ``b`` share their noise draws, so the comparison is paired."""
        pair = images if images is not None else latents
        if (images is None) == (latents is None) or len(pair) != 2:
            raise ValueError("pass images=(a, b) or latents=(a, b)")
        a, b = pair
        count = len(a)
        if len(b) != count:
            raise ValueError(f"a has {count} items and b has {len(b)}")
        kind = "images" if images is not None else "latents"
        seeds = [seed + i for i in range(count)]
        score_a = self.score(prompts, **{kind: a}, u=u, n_draws=n_draws, seeds=seeds)
        score_b = self.score(prompts, **{kind: b}, u=u, n_draws=n_draws, seeds=seeds)
        sigma = score_a.sigmas[0].expand_as(score_a.raw)
        return pair_probability(self.model.config.model.model_type, score_a.raw, score_b.raw, sigma)

    def _text_conditioning(self, prompts, prompt_embeds, pooled_prompt_embeds, count) -> tuple[torch.Tensor, torch.Tensor]:
        if prompts is not None:
            if prompt_embeds is not None or pooled_prompt_embeds is not None:
                raise ValueError("pass prompts or prompt_embeds + pooled_prompt_embeds, not both")
            if self.prompt_encoder is None:
                raise ValueError("this scorer has no text encoders (built with text_encoders='none'): pass prompt_embeds "
                                 "and pooled_prompt_embeds instead of prompts")
            return self.prompt_encoder(_match_prompts(prompts, count))
        if isinstance(prompt_embeds, (list, tuple)):  # Z-Image's pipeline: one (tokens, width) tensor per prompt
            prompt_embeds, pooled_prompt_embeds = padded_with_mask(prompt_embeds)
        elif prompt_embeds is not None and pooled_prompt_embeds is None and self.model.base_backbone.pooled_width is None:
            pooled_prompt_embeds = torch.ones(prompt_embeds.shape[:2])  # Qwen-Image's pipeline gives no mask when no token is padding
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError("pass prompts, or both prompt_embeds and pooled_prompt_embeds (Z-Image, Qwen-Image: the text mask)")
        if prompt_embeds.shape[0] != count or pooled_prompt_embeds.shape[0] != count:
            raise ValueError(
                f"got {prompt_embeds.shape[0]} prompt_embeds and {pooled_prompt_embeds.shape[0]} pooled_prompt_embeds "
                f"for {count} images/latents"
            )
        return prompt_embeds, pooled_prompt_embeds

    @staticmethod
    def _draw_noise(shape: tuple, index: list[int], seeds: list[int] | None, generator) -> torch.Tensor:
        """(draws, levels, B, C, H, W) standard normal noise, drawn on the CPU so seeds repeat on any device."""
        draws, levels, *item = shape
        if seeds is None:
            return torch.randn((draws, levels, len(index), *item), generator=generator)
        per_item = [torch.randn((draws, levels, *item), generator=torch.Generator().manual_seed(seeds[i])) for i in index]
        return torch.stack(per_item, dim=2)

    def _latent_groups(self, images, latents) -> list[tuple[list[int], torch.Tensor]]:
        """Batches of equally sized latents, with their positions in the input."""
        if latents is not None:
            if not torch.is_tensor(latents) or latents.dim() != 4:
                raise ValueError("latents must be a (B, C, H, W) tensor")
            return [(list(range(latents.shape[0])), latents)]
        by_size: dict[tuple, list[int]] = {}
        encoded = self.encode_images(images)
        for i, z in enumerate(encoded):
            by_size.setdefault(tuple(z.shape), []).append(i)
        return [(index, torch.cat([encoded[i] for i in index])) for index in by_size.values()]

    def _score_latents(self, latents, states, pooled, sigmas, timesteps, noise) -> torch.Tensor:
        model = self.model
        latents = latents.to(model.device, model.dtype)
        model.check_latents(latents)
        n_draws, levels, batch = noise.shape[:3]
        states, pooled = states.to(model.device, model.dtype), pooled.to(model.device, model.dtype)
        if model.config.training.add_noise:
            sigma = sigmas.view(1, levels, 1, 1, 1, 1).to(model.device)
            noisy = add_noise(latents.unsqueeze(0).unsqueeze(0), sigma, noise.to(model.device, model.dtype))
        else:
            noisy = latents.expand(n_draws, levels, *latents.shape)
        noisy = noisy.transpose(0, 1).reshape(levels, n_draws * batch, *latents.shape[1:])
        scores = model.forward_ensemble(
            noisy,
            states.repeat(n_draws, 1, 1),
            pooled.repeat(n_draws, 1),
            timesteps.to(model.device).view(levels, 1).expand(levels, n_draws * batch),
            max_batch_items=self.max_batch_items,
        )
        return scores.view(n_draws, batch, -1)[..., 0].mean(dim=0)


def text_length(model: DiNaLRM, requested: int | None) -> int:
    """The T5 token count to encode prompts with: the one the model was trained with (its config's
    ``data.train.max_sequence_length``), unless ``requested`` overrides it, with a warning, because
    another length changes every score."""
    trained = model.config.data.train.max_sequence_length
    if requested is not None and requested != trained:
        warnings.warn(f"scoring with {requested} T5 tokens, but this reward model was trained with {trained}: "
                      "scores will differ from the trained model's", stacklevel=3)
    return trained if requested is None else requested


def _check_seeds(seeds, count: int) -> list[int] | None:
    if seeds is None:
        return None
    seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images/latents; give one seed per item")
    return seeds


def _match_prompts(prompts: str | list[str], count: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"got {len(prompts)} prompts for {count} images/latents; give one prompt per item, or one string")
    return prompts
