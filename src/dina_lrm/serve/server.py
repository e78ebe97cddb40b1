"""``dina-lrm serve``: a micro-batched HTTP reward server for latents (protocol in ``protocol.py``).

Endpoints: ``POST /v1/score``, ``GET /healthz``, ``GET /v1/metadata``, ``GET /v1/metrics``.
Bad requests get a 4xx with a JSON ``{"error": ...}``; a failure inside scoring gets a 500 for that
request only. Handler threads parse and check requests; one worker thread runs the model.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import dina_lrm
from dina_lrm.config import from_dict
from dina_lrm.losses import thurstone_variance
from dina_lrm.scorer import DTYPES, SCORE_OFFSET, SCORE_SCALE, Scorer
from dina_lrm.serve.batcher import MicroBatcher, WorkItem
from dina_lrm.serve.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, BadRequest, ScoreRequest, parse_request, score_response


@dataclass
class ServeConfig:
    reward: str = ""  # DiNa-LRM reward model directory
    model: str = ""  # its generator pipeline: local directory or hub id
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_size: int = 8  # items per backbone pass
    max_wait_ms: float = 10.0  # how long the oldest waiting item may wait for others
    max_request_mb: float = 64.0  # larger bodies get 413
    default_u: float = 0.4  # noise level when a request gives none (0.4 suits a generator's clean latents)
    max_sequence_length: int = 128  # T5 tokens when the server encodes prompts

    @classmethod
    def from_dict(cls, raw: dict) -> ServeConfig:
        return from_dict(cls, raw)

    def validate(self) -> None:
        if not self.reward or not self.model:
            raise ValueError("serve needs --reward (reward model directory) and --model (its generator)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.max_request_mb <= 0 or not 0 <= self.default_u <= 1:
            raise ValueError("max_request_mb must be > 0 and default_u in [0, 1]")


class RewardService:
    """What the HTTP handler calls: request checks, prompt encoding, the micro-batcher, metrics."""

    def __init__(self, scorer: Scorer, config: ServeConfig):
        self.scorer = scorer
        self.config = config
        self.batcher = MicroBatcher(self._score_batch, config.max_batch_size, config.max_wait_ms)
        self._responses: Counter[int] = Counter()
        self._metrics_lock = threading.Lock()
        self._text_lock = threading.Lock()  # the prompt cache is not thread-safe
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns()) % 2**63)
        self._seed_lock = threading.Lock()

    @property
    def max_request_bytes(self) -> int:
        return int(self.config.max_request_mb * 2**20)

    def score(self, body: bytes) -> dict:
        request = parse_request(body, self.config.default_u)
        prompt_embeds, pooled = self._text(request)
        try:
            self.scorer.model.check_inputs(request.latents, prompt_embeds, pooled)
        except ValueError as err:
            raise BadRequest(422, str(err)) from None
        seeds = request.seeds if request.seeds is not None else self._random_seeds(request.batch)
        items = [
            WorkItem(request.latents[i], prompt_embeds[i], pooled[i], request.levels[i], request.n_draws, seeds[i])
            for i in range(request.batch)
        ]
        results = [future.result() for future in self.batcher.submit(items)]
        return score_response(
            raw=[r["raw"] for r in results], sigmas=[r["sigmas"] for r in results], thurstone_std=[r["thurstone_std"] for r in results]
        )

    def _text(self, request: ScoreRequest) -> tuple[torch.Tensor, torch.Tensor]:
        if request.prompts is None:
            return request.prompt_embeds, request.pooled_prompt_embeds
        with self._text_lock:
            states, pooled = self.scorer.prompt_encoder(request.prompts)
        return states.cpu(), pooled.cpu()

    def _random_seeds(self, count: int) -> list[int]:
        with self._seed_lock:
            return torch.randint(0, 2**62, (count,), generator=self._seed_source).tolist()

    def _score_batch(self, items: list[WorkItem]) -> list[dict]:
        first = items[0]
        result = self.scorer.score(
            latents=torch.stack([item.latent for item in items]),
            prompt_embeds=torch.stack([item.prompt_embeds for item in items]),
            pooled_prompt_embeds=torch.stack([item.pooled_prompt_embeds for item in items]),
            noise_levels=list(first.levels),
            n_draws=first.n_draws,
            seeds=[item.seed for item in items],
        )
        sigmas, std = result.sigmas.tolist(), result.thurstone_std.tolist()
        return [{"raw": float(raw), "sigmas": sigmas, "thurstone_std": std} for raw in result.raw]

    def metadata(self) -> dict:
        model, backbone = self.scorer.model, self.scorer.model.base_backbone
        return {
            "name": "dina-lrm",
            "version": dina_lrm.__version__,
            "protocol_version": PROTOCOL_VERSION,
            "reward": self.config.reward,
            "generator": self.config.model,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "model_config": model.config.to_dict(),
            "inputs": {
                "latent_channels": backbone.latent_channels,
                "patch_size": backbone.patch_size,
                "prompt_embeds_width": backbone.text_width,
                "pooled_prompt_embeds_width": backbone.pooled_width,
                "max_sequence_length": self.scorer.prompt_encoder.max_sequence_length,
            },
            "score_scale": {
                "raw": "the reward head's output; differences are Thurstone utilities",
                "normalized": f"(raw + {SCORE_OFFSET:g}) / {SCORE_SCALE:g}",
                "thurstone_std": "sqrt(2 sigma^2 + 0.05): P(a preferred over b) = Phi((raw_a - raw_b) / (sqrt(2) * std))",
                "default_u": self.config.default_u,
                "thurstone_std_at_default_u": float(thurstone_variance(self.scorer.sigma_table.snap(
                    torch.tensor([self.config.default_u]))[0]).sqrt()),
            },
            "limits": {"max_batch_size": self.config.max_batch_size, "max_wait_ms": self.config.max_wait_ms,
                       "max_request_bytes": self.max_request_bytes},
        }

    def record_response(self, status: int) -> None:
        with self._metrics_lock:
            self._responses[status] += 1

    def metrics(self) -> dict:
        histogram = dict(sorted(self.batcher.batch_sizes.items()))
        return {
            "items_scored": sum(size * count for size, count in histogram.items()),
            "responses": {str(status): count for status, count in sorted(self._responses.items())},
            "batch_size_histogram": {str(size): count for size, count in histogram.items()},
        }

    def close(self) -> None:
        self.batcher.close()


DRAIN_FACTOR = 16  # oversized bodies up to this many times the limit are read and dropped, larger ones not


class RewardRequestHandler(BaseHTTPRequestHandler):
    server_version = f"dina-lrm/{dina_lrm.__version__}"
    protocol_version = "HTTP/1.1"
    service: RewardService  # set by make_server

    def do_GET(self) -> None:
        routes = {"/healthz": lambda: {"status": "ok"}, "/v1/metadata": self.service.metadata, "/v1/metrics": self.service.metrics}
        if self.path not in routes:
            return self._reply(404, {"error": f"no such endpoint {self.path}; try POST /v1/score, GET {sorted(routes)}"})
        self._reply(200, routes[self.path]())

    def do_POST(self) -> None:
        if self.path != "/v1/score":
            self._discard_body()
            return self._reply(404, {"error": f"no such endpoint {self.path}; scores are posted to /v1/score"})
        try:
            self._reply(200, self.service.score(self._read_body()))
        except BadRequest as err:
            self._reply(err.status, {"error": str(err)})
        except Exception as err:  # a bug or a device error: fail this request, keep serving
            self._reply(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})

    def _read_body(self) -> bytes:
        version = self.headers.get(PROTOCOL_HEADER)
        if version is not None and version != PROTOCOL_VERSION:
            self._discard_body()
            raise BadRequest(400, f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION!r}")
        length = self.headers.get("content-length")
        if length is None:
            self.close_connection = True
            raise BadRequest(411, "a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest(400, f"bad Content-Length {length!r}") from None
        if length > self.service.max_request_bytes:
            self._discard_body()
            raise BadRequest(413, f"request body of {length} bytes exceeds the limit of {self.service.max_request_bytes} bytes")
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        """Read and drop the body, so the client can read our answer instead of hitting a closed socket;
        a body far over the limit is not read at all: the connection closes after the answer."""
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= DRAIN_FACTOR * self.service.max_request_bytes:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 2**20))
            if not chunk:  # the client hung up
                self.close_connection = True
                return
            length -= len(chunk)

    def _reply(self, status: int, payload: dict) -> None:
        self.service.record_response(status)
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header(PROTOCOL_HEADER, PROTOCOL_VERSION)
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet by default: a busy RL loop would flood the console with access lines."""


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error of ours
            super().handle_error(request, client_address)


def make_server(service: RewardService, host: str = "127.0.0.1", port: int = 0) -> RewardHTTPServer:
    """A threaded HTTP server on (host, port); port 0 picks a free one (``server.server_address``)."""
    handler = type("Handler", (RewardRequestHandler,), {"service": service})
    return RewardHTTPServer((host, port), handler)


def load_service(config: ServeConfig) -> RewardService:
    config.validate()
    scorer = Scorer.from_pretrained(
        config.reward, config.model, device=config.device, dtype=DTYPES[config.dtype], max_sequence_length=config.max_sequence_length
    )
    return RewardService(scorer, config)


def serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    service = load_service(config)
    server = make_server(service, config.host, config.port)
    host, port = server.server_address[:2]
    print(f"dina-lrm reward server on http://{host}:{port} (POST /v1/score; GET /healthz /v1/metadata /v1/metrics)", flush=True)
    print(json.dumps({k: v for k, v in asdict(config).items() if k not in ("reward", "model")}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
