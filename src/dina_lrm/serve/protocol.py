"""The latent-scoring wire format, version 1 (the one verl-omni's ``latent_http_scorer_client`` speaks).

Request: ``POST /v1/score``, body = safetensors bytes, header ``x-drm-protocol-version: 1`` (optional).

| tensor | shape | dtype | |
|---|---|---|---|
| ``latents`` | (B, C, H, W) | float | normalised clean VAE latents, required |
| ``prompt_embeds`` | (B, L, D) | float | the pipeline's prompt embeddings (or ``prompts`` metadata) |
| ``pooled_prompt_embeds`` | (B, P) | float | the pipeline's pooled embeddings |
| ``u`` | (1,) or (B,) | float | noise level(s) in [0, 1] (default: the server's) |
| ``seeds`` | (1,) or (B,) | int | noise seed per item; one seed s for B items means s, s+1, ... |
| ``noise_levels`` | (K,) | float | multi-level ensemble instead of ``u`` |
| ``n_draws`` | (1,) | int | noise draws averaged per item (default 1) |

Instead of embeddings, the safetensors metadata may carry ``prompts``: a JSON list of B strings,
which the server encodes with the generator's text encoders (and caches). Their count and length are
limited (:class:`PromptLimits`); the check comes before any tokenisation.

Response (JSON): ``protocol_version``, ``raw_scores`` (B floats), ``normalized_scores``
(``(raw + 10) / 10``), ``sigmas`` and ``thurstone_std`` (per item, one entry per noise level).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

PROTOCOL_VERSION = "1"
PROTOCOL_HEADER = "x-drm-protocol-version"
TENSOR_FIELDS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "u", "seeds", "noise_levels", "n_draws")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NOISE_LEVELS, MAX_DRAWS = 8, 64
TENSOR_HEADER_BYTES = 2**16  # the safetensors header without prompts: 7 tensor entries need far less


@dataclass(frozen=True)
class PromptLimits:
    max_prompts: int = 256  # prompts per request
    max_prompt_chars: int = 2000  # characters per prompt

    @property
    def max_header_bytes(self) -> int:
        """The largest safetensors header a request within these limits can have (JSON escapes a
        character in at most 6 bytes); a larger one is refused before the body is read."""
        return TENSOR_HEADER_BYTES + self.max_prompts * (6 * self.max_prompt_chars + 4)


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreRequest:
    latents: torch.Tensor  # (B, C, H, W)
    prompt_embeds: torch.Tensor | None  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor | None  # (B, P)
    prompts: list[str] | None
    levels: list[tuple[float, ...]]  # per item: the noise levels it is scored at
    seeds: list[int] | None
    n_draws: int

    @property
    def batch(self) -> int:
        return self.latents.shape[0]


def encode_request(
    latents: torch.Tensor,
    *,
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    prompts: list[str] | None = None,
    u: float | list[float] | None = None,
    seeds: list[int] | None = None,
    noise_levels: list[float] | None = None,
    n_draws: int | None = None,
) -> bytes:
    """The request body (the client side of :func:`parse_request`)."""
    tensors = {"latents": latents}
    if prompt_embeds is not None:
        tensors["prompt_embeds"] = prompt_embeds
    if pooled_prompt_embeds is not None:
        tensors["pooled_prompt_embeds"] = pooled_prompt_embeds
    if u is not None:
        tensors["u"] = torch.tensor([u] if isinstance(u, (int, float)) else list(u), dtype=torch.float32)
    if seeds is not None:
        tensors["seeds"] = torch.tensor(list(seeds), dtype=torch.int64)
    if noise_levels is not None:
        tensors["noise_levels"] = torch.tensor(list(noise_levels), dtype=torch.float32)
    if n_draws is not None:
        tensors["n_draws"] = torch.tensor([n_draws], dtype=torch.int64)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return save_tensors(tensors, metadata={"prompts": json.dumps(prompts)} if prompts is not None else None)


def header_size(prefix: bytes) -> int:
    """The safetensors header length that the first 8 bytes of a body announce."""
    if len(prefix) < 8:
        raise BadRequest(400, "malformed safetensors payload: shorter than its 8-byte header length")
    return struct.unpack("<Q", prefix[:8])[0]


def parse_request(body: bytes, default_u: float, limits: PromptLimits = PromptLimits()) -> ScoreRequest:
    """Decode and check a request body; any problem raises :class:`BadRequest` (400, 413 or 422)."""
    if body and header_size(body) > limits.max_header_bytes:
        raise BadRequest(413, f"the safetensors header ({header_size(body)} bytes) exceeds {limits.max_header_bytes} bytes: "
                              f"at most {limits.max_prompts} prompts of {limits.max_prompt_chars} characters")
    tensors, metadata = _read_safetensors(body)
    unknown = sorted(set(tensors) - set(TENSOR_FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown tensors {unknown}; allowed: {list(TENSOR_FIELDS)}")
    if "latents" not in tensors:
        raise BadRequest(400, "missing tensor 'latents' (B, C, H, W)")
    latents = _float_tensor(tensors, "latents", dims=4)
    batch = latents.shape[0]
    if batch == 0:
        raise BadRequest(422, "latents hold no items (batch size 0)")
    prompts = _prompts(metadata, batch, limits)
    embeds = [_float_tensor(tensors, name, dims) for name, dims in (("prompt_embeds", 3), ("pooled_prompt_embeds", 2))]
    if prompts is None and any(e is None for e in embeds):
        raise BadRequest(400, "give prompt_embeds and pooled_prompt_embeds tensors, or a 'prompts' JSON list in the metadata")
    if prompts is not None and any(e is not None for e in embeds):
        raise BadRequest(400, "give prompt embeddings or prompts, not both")
    for name, tensor in zip(("prompt_embeds", "pooled_prompt_embeds"), embeds):
        if tensor is not None and tensor.shape[0] != batch:
            raise BadRequest(422, f"{name} has batch {tensor.shape[0]} but latents have {batch}")
    return ScoreRequest(
        latents=latents,
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        prompts=prompts,
        levels=_levels(tensors, batch, default_u),
        seeds=_seeds(tensors, batch),
        n_draws=_n_draws(tensors),
    )


def score_response(raw: list[float], sigmas: list[list[float]], thurstone_std: list[list[float]]) -> dict:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "raw_scores": raw,
        "normalized_scores": [(r + 10.0) / 10.0 for r in raw],
        "sigmas": sigmas,
        "thurstone_std": thurstone_std,
    }


def _read_safetensors(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not body:
        raise BadRequest(400, "empty request body: send the tensors as safetensors bytes")
    try:
        tensors = load_tensors(body)
        size = header_size(body)
        metadata = json.loads(body[8 : 8 + size]).get("__metadata__") or {}
    except Exception as err:  # safetensors raises its own error types, struct and json theirs
        raise BadRequest(400, f"malformed safetensors payload: {err}") from None
    return tensors, metadata


def _float_tensor(tensors: dict, name: str, dims: int) -> torch.Tensor | None:
    tensor = tensors.get(name)
    if tensor is None:
        return None
    if tensor.dtype not in FLOAT_DTYPES:
        raise BadRequest(422, f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise BadRequest(422, f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")
    if 0 in tensor.shape[1:]:
        raise BadRequest(422, f"{name} has an empty dimension: shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise BadRequest(422, f"{name} contains NaN or inf")
    return tensor


def _prompts(metadata: dict, batch: int, limits: PromptLimits) -> list[str] | None:
    if "prompts" not in metadata:
        return None
    try:
        prompts = json.loads(metadata["prompts"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadRequest(400, f"metadata 'prompts' is not readable JSON: {type(err).__name__}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(422, "metadata 'prompts' must be a JSON list of strings")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(413, f"{len(prompts)} prompts exceed the limit of {limits.max_prompts} per request")
    longest = max((len(p) for p in prompts), default=0)
    if longest > limits.max_prompt_chars:
        raise BadRequest(413, f"a prompt of {longest} characters exceeds the limit of {limits.max_prompt_chars}")
    if len(prompts) != batch:
        raise BadRequest(422, f"got {len(prompts)} prompts for {batch} latents")
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(422, "a prompt is not valid Unicode text (a lone surrogate)") from None
    return prompts


def _per_item(tensor: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    tensor = tensor.reshape(-1)
    if tensor.numel() not in (1, batch):
        raise BadRequest(422, f"{name} must hold 1 or {batch} values, got shape {tuple(tensor.shape)}")
    return tensor


def _levels(tensors: dict, batch: int, default_u: float) -> list[tuple[float, ...]]:
    if "noise_levels" in tensors:
        if "u" in tensors:
            raise BadRequest(400, "give u or noise_levels, not both")
        levels = _unit_interval(tensors["noise_levels"].reshape(-1), "noise_levels")
        if not 1 <= len(levels) <= MAX_NOISE_LEVELS:
            raise BadRequest(422, f"noise_levels must hold 1 to {MAX_NOISE_LEVELS} levels, got {len(levels)}")
        return [tuple(levels)] * batch
    if "u" not in tensors:
        return [(default_u,)] * batch
    u = _unit_interval(_per_item(tensors["u"], "u", batch), "u")
    return [(value,) for value in (u * batch if len(u) == 1 else u)]


def _unit_interval(tensor: torch.Tensor, name: str) -> list[float]:
    if not tensor.is_floating_point():
        raise BadRequest(422, f"{name} must be floating point, got {tensor.dtype}")
    values = tensor.double().tolist()
    if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
        raise BadRequest(422, f"{name} must lie in [0, 1], got {values}")
    return values


def _seeds(tensors: dict, batch: int) -> list[int] | None:
    if "seeds" not in tensors:
        return None
    seeds = _per_item(tensors["seeds"], "seeds", batch)
    if seeds.is_floating_point() or seeds.dtype == torch.bool:
        raise BadRequest(422, f"seeds must be integers, got {seeds.dtype}")
    values = seeds.tolist()
    return [values[0] + i for i in range(batch)] if len(values) == 1 else values


def _n_draws(tensors: dict) -> int:
    if "n_draws" not in tensors:
        return 1
    draws = tensors["n_draws"].reshape(-1)
    if draws.numel() != 1 or draws.is_floating_point():
        raise BadRequest(422, f"n_draws must be one integer, got {draws.dtype} of shape {tuple(draws.shape)}")
    value = int(draws[0])
    if not 1 <= value <= MAX_DRAWS:
        raise BadRequest(422, f"n_draws must be between 1 and {MAX_DRAWS}, got {value}")
    return value
