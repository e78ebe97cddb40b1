"""``dina-lrm serve``'s settings: each field's help is the CLI flag's (no torch import here, so ``--help``
stays instant)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dina_lrm.config import AUTOCAST_NAMES, DTYPE_NAMES, LATENT_U, TEXT_ENCODER_MODES, from_dict, setting

API_KEY_ENV = "DINA_LRM_API_KEY"


@dataclass
class ServeConfig:
    reward: str = setting("", "reward model directory (config.json + checkpoint/); --model-path is verl-omni's name for it",
                          flags=("--reward", "--model-path"))
    model: str = setting("", "generator pipeline: local directory or hub id; --base-model-path is verl-omni's name for it",
                         flags=("--model", "--base-model-path"))
    host: str = setting("127.0.0.1", "address to bind (another address without --api-key warns)")
    port: int = setting(8000, "port to listen on; 0 picks a free port (printed at start)")
    device: str = setting("cpu", "where the reward model runs")
    dtype: str = setting("float32", "precision of the reward model", choices=DTYPE_NAMES)
    autocast: str = setting("", "run the backbone in half precision, the head in --dtype", choices=AUTOCAST_NAMES)
    compile: bool = setting(False, "torch.compile the kept blocks (the first batch of each shape compiles)")
    max_batch_size: int = setting(8, "items per backbone pass")
    max_wait_ms: float = setting(10.0, "how long the oldest waiting item may wait for others to batch with")
    max_request_mb: float = setting(64.0, "larger request bodies get HTTP 413")
    default_u: float = setting(LATENT_U, "noise level when a request gives none (clients send a generator's clean latents)")
    max_sequence_length: int | None = setting(None, "T5 tokens when the server encodes prompts (default: the model's own)")
    text_encoders: str = setting("device", "where the text encoders live: device, cpu (prompts encode there), or none (not loaded: "
                                 "clients send prompt embeddings, a prompt gets HTTP 400)", choices=TEXT_ENCODER_MODES)
    max_prompts: int = setting(256, "prompts per request; more get HTTP 413")
    max_prompt_chars: int = setting(2000, "characters per prompt; longer get HTTP 413")
    idle_timeout_s: float = setting(30.0, "close a connection that sends no request for this long")
    header_timeout_s: float = setting(10.0, "the request line and headers must arrive within this")
    body_timeout_s: float = setting(60.0, "the body must arrive within this, else HTTP 408")
    max_connections: int = setting(256, "open connections; more get HTTP 503")
    backlog: int = setting(128, "listen queue length")
    api_key: str = setting("", f"require 'Authorization: Bearer KEY' on every endpoint but /healthz (default: ${API_KEY_ENV}; "
                               "none: no authentication)")

    @classmethod
    def from_dict(cls, raw: dict) -> ServeConfig:
        return from_dict(cls, raw)

    def validate(self) -> None:
        if not self.reward or not self.model:
            raise ValueError("serve needs --reward (reward model directory) and --model (its generator)")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPE_NAMES)}")
        if self.autocast not in ("", *AUTOCAST_NAMES):
            raise ValueError(f"unknown autocast {self.autocast!r}; choose one of {sorted(AUTOCAST_NAMES)}")
        if self.text_encoders not in TEXT_ENCODER_MODES:
            raise ValueError(f"unknown text_encoders {self.text_encoders!r}; choose one of {TEXT_ENCODER_MODES}")
        if self.max_request_mb <= 0 or not 0 <= self.default_u <= 1:
            raise ValueError("max_request_mb must be > 0 and default_u in [0, 1]")
        positive = ("max_prompts", "max_prompt_chars", "idle_timeout_s", "header_timeout_s", "body_timeout_s", "max_connections", "backlog")
        bad = [name for name in positive if not getattr(self, name) > 0]
        if bad:
            raise ValueError(f"these serve limits must be > 0: {', '.join(bad)}")

    @property
    def prompt_limits(self):
        from dina_lrm.serve.protocol import PromptLimits

        return PromptLimits(self.max_prompts, self.max_prompt_chars)

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV, "")
