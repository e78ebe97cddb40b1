"""``dina-lrm serve``: a micro-batched HTTP reward server for latents (protocol in ``protocol.py``).

Endpoints: ``POST /v1/score``, ``GET /healthz``, ``GET /v1/metadata``, ``GET /v1/metrics``.
Bad requests get a 4xx with a JSON ``{"error": ...}``; a failure inside scoring gets a 500 for that
request only. Handler threads parse and check requests; one worker thread runs the model. Clients
cannot tie the server up: every phase of a connection (waiting for a request, its headers, its body)
has a deadline, open connections are capped, and prompts are bounded before they are tokenised.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import select
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import dina_lrm
from dina_lrm.losses import thurstone_variance
from dina_lrm.pipelines import DTYPES
from dina_lrm.scorer import SCORE_OFFSET, SCORE_SCALE, Scorer
from dina_lrm.serve.batcher import MicroBatcher, WorkItem
from dina_lrm.serve.config import API_KEY_ENV, ServeConfig
from dina_lrm.serve.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    BadRequest,
    ScoreRequest,
    header_size,
    parse_request,
    score_response,
)


class RewardService:
    """What the HTTP handler calls: request checks, prompt encoding, the micro-batcher, metrics."""

    def __init__(self, scorer: Scorer, config: ServeConfig):
        self.scorer = scorer
        self.config = config
        self.api_key = config.resolved_api_key()
        self.batcher = MicroBatcher(self._score_batch, config.max_batch_size, config.max_wait_ms)
        self._responses: Counter[int] = Counter()
        self._abandoned = 0
        self._metrics_lock = threading.Lock()
        self._text_lock = threading.Lock()  # one prompt encoding at a time: the text encoders' memory stays bounded
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns()) % 2**63)
        self._seed_lock = threading.Lock()

    @property
    def max_request_bytes(self) -> int:
        return int(self.config.max_request_mb * 2**20)

    def score(self, body: bytes, client_gone=lambda: False) -> dict | None:
        """The response to a request body, or None when ``client_gone()`` says nobody waits for it."""
        request = parse_request(body, self.config.default_u, self.config.prompt_limits)
        if client_gone():
            return None
        prompt_embeds, pooled = self._text(request)
        try:
            self.scorer.model.check_inputs(request.latents, prompt_embeds, pooled)
        except ValueError as err:
            raise BadRequest(422, str(err)) from None
        if client_gone():
            return None
        seeds = request.seeds if request.seeds is not None else self._random_seeds(request.batch)
        items = [
            WorkItem(request.latents[i], prompt_embeds[i], pooled[i], request.levels[i], request.n_draws, seeds[i])
            for i in range(request.batch)
        ]
        results = [future.result() for future in self.batcher.submit(items)]
        raw = [r["raw"] for r in results]
        if not all(math.isfinite(value) for value in raw):
            raise BadRequest(422, "the reward model returned NaN or inf for these finite latents (its weights were checked finite "
                                  "at load): are they normalised VAE latents of a sane range?")
        return score_response(raw=raw, sigmas=[r["sigmas"] for r in results], thurstone_std=[r["thurstone_std"] for r in results])

    def _text(self, request: ScoreRequest) -> tuple[torch.Tensor, torch.Tensor]:
        if request.prompts is None:
            return request.prompt_embeds, request.pooled_prompt_embeds
        if self.scorer.prompt_encoder is None:
            raise BadRequest(400, "this server loaded no text encoders (--text-encoders none): send prompt_embeds and "
                                  "pooled_prompt_embeds tensors instead of prompts")
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
            allow_nonfinite=True,
        )
        sigmas, std = result.sigmas.tolist(), result.thurstone_std.tolist()
        return [{"raw": float(raw), "sigmas": sigmas, "thurstone_std": std} for raw in result.raw]

    def metadata(self) -> dict:
        model, backbone = self.scorer.model, self.scorer.model.base_backbone
        config = self.config
        return {
            "name": "dina-lrm",
            "version": dina_lrm.__version__,
            "protocol_version": PROTOCOL_VERSION,
            "reward": display_name(config.reward),
            "generator": display_name(config.model),
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "model_config": model.config.to_dict(),
            "backbone": model.backbone_name,
            "inputs": {
                "latent_channels": backbone.latent_channels,
                "patch_size": backbone.patch_size,
                "prompt_embeds_width": backbone.text_width,
                "pooled_prompt_embeds_width": "text mask (B, tokens)" if backbone.pooled_width is None else backbone.pooled_width,
                "max_sequence_length": self.scorer.prompt_encoder.max_sequence_length if self.scorer.prompt_encoder else None,
                "text_encoders": config.text_encoders,
            },
            "score_scale": {
                "raw": "the reward head's output; differences are Thurstone utilities",
                "normalized": f"(raw + {SCORE_OFFSET:g}) / {SCORE_SCALE:g}",
                "thurstone_std": "sqrt(2 sigma^2 + 0.05): P(a preferred over b) = Phi((raw_a - raw_b) / (sqrt(2) * std))",
                "default_u": config.default_u,
                "thurstone_std_at_default_u": float(thurstone_variance(self.scorer.sigma_table.snap(
                    torch.tensor([config.default_u]))[0]).sqrt()),
            },
            "limits": {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                       "max_request_bytes": self.max_request_bytes, "max_prompts": config.max_prompts,
                       "max_prompt_chars": config.max_prompt_chars, "idle_timeout_s": config.idle_timeout_s,
                       "header_timeout_s": config.header_timeout_s, "body_timeout_s": config.body_timeout_s,
                       "max_connections": config.max_connections},
            "authentication": "bearer" if self.api_key else "none",
        }

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self.api_key}".encode())

    def record_response(self, status: int) -> None:
        with self._metrics_lock:
            self._responses[status] += 1

    def record_abandoned(self) -> None:
        """A request whose client left before its answer was written."""
        with self._metrics_lock:
            self._abandoned += 1

    def metrics(self) -> dict:
        histogram = dict(sorted(self.batcher.batch_sizes.items()))
        with self._metrics_lock:
            responses, abandoned = dict(sorted(self._responses.items())), self._abandoned
        return {
            "items_scored": sum(size * count for size, count in histogram.items()),
            "responses": {str(status): count for status, count in responses.items()},
            "abandoned": abandoned,
            "batch_size_histogram": {str(size): count for size, count in histogram.items()},
        }

    def close(self) -> None:
        self.batcher.close()


def display_name(path_or_id: str) -> str:
    """A local directory by its name only (the server does not publish its filesystem); a hub id as it is."""
    return Path(path_or_id).name if Path(path_or_id).exists() else path_or_id


class Deadlines:
    """One thread that ends each connection's current phase (waiting for a request, reading its
    headers, reading its body, writing the answer) when it runs past its deadline, by shutting the
    socket's read side: the handler's blocked read returns, and it can still answer (408)."""

    def __init__(self, period_s: float = 0.05):
        self._deadlines: dict[socket.socket, float] = {}
        self._expired: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._period_s = period_s
        threading.Thread(target=self._run, name="dina-lrm-deadlines", daemon=True).start()

    def start(self, connection: socket.socket, seconds: float) -> None:
        with self._lock:
            self._deadlines[connection] = time.monotonic() + seconds

    def stop(self, connection: socket.socket) -> bool:
        """Ends the connection's deadline; True if it had expired."""
        with self._lock:
            self._deadlines.pop(connection, None)
            expired = connection in self._expired
            self._expired.discard(connection)
        return expired

    def close(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            now = time.monotonic()
            with self._lock:
                overdue = [connection for connection, deadline in self._deadlines.items() if deadline < now]
                for connection in overdue:
                    del self._deadlines[connection]
                    self._expired.add(connection)
            for connection in overdue:
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


DRAIN_FACTOR = 16  # oversized bodies up to this many times the limit are read and dropped, larger ones not


class RewardRequestHandler(BaseHTTPRequestHandler):
    server_version = f"dina-lrm/{dina_lrm.__version__}"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # answers to unreadable request lines get a status line too
    service: RewardService  # set by make_server
    server: RewardHTTPServer
    request_count = 0

    def handle_one_request(self) -> None:
        """Wait for the next request within the idle timeout, then read its line and headers within
        the header timeout (the rest of the base class's work is unchanged)."""
        deadlines, config = self.server.deadlines, self.service.config
        if self.request_count:  # the first wait began when the server accepted the connection
            deadlines.start(self.connection, config.idle_timeout_s)
        self.request_count += 1
        try:
            arrived = self.rfile.peek(1)
        except OSError:
            arrived = b""
        if deadlines.stop(self.connection) or not arrived:
            self.close_connection = True
            return
        deadlines.start(self.connection, config.header_timeout_s)
        try:
            super().handle_one_request()
        finally:
            deadlines.stop(self.connection)

    def do_GET(self) -> None:
        if self.server.deadlines.stop(self.connection):
            return self._headers_timed_out()
        routes = {"/healthz": lambda: {"status": "ok"}, "/v1/metadata": self.service.metadata, "/v1/metrics": self.service.metrics}
        if self.path not in routes:
            return self._reply(404, {"error": f"no such endpoint {self.path}; try POST /v1/score, GET {sorted(routes)}"})
        if self.path != "/healthz" and not self.service.authorized(self.headers.get("authorization")):
            return self._unauthorized()
        self._reply(200, routes[self.path]())

    def do_POST(self) -> None:
        if self.server.deadlines.stop(self.connection):
            return self._headers_timed_out()
        if not self.service.authorized(self.headers.get("authorization")):
            self._discard_body()
            return self._unauthorized()
        if self.path != "/v1/score":
            self._discard_body()
            return self._reply(404, {"error": f"no such endpoint {self.path}; scores are posted to /v1/score"})
        try:
            body = self._read_body()
            payload = None if body is None else self.service.score(body, self._client_gone)
        except BadRequest as err:
            return self._reply(err.status, {"error": str(err)})
        except Exception as err:  # a bug or a device error: fail this request, keep serving
            return self._reply(500, {"error": f"scoring failed: {type(err).__name__}: {err}"})
        if payload is None:  # the client left: nobody to answer
            self.service.record_abandoned()
            self.close_connection = True
            return
        self._reply(200, payload)

    def _read_body(self) -> bytes | None:
        """The body, or None if the client hung up before sending all of it."""
        version = self.headers.get(PROTOCOL_HEADER)
        if version is not None and version != PROTOCOL_VERSION:
            self._discard_body()
            raise BadRequest(400, f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION!r}")
        length = self._content_length()
        if length > self.service.max_request_bytes:
            self._discard_body()
            raise BadRequest(413, f"request body of {length} bytes exceeds the limit of {self.service.max_request_bytes} bytes")
        deadlines = self.server.deadlines
        deadlines.start(self.connection, self.service.config.body_timeout_s)
        try:
            self._refuse_large_header(length)
            body = self.rfile.read(length)
        finally:
            expired = deadlines.stop(self.connection)
        if len(body) < length:
            self.close_connection = True
            if expired:
                raise BadRequest(408, f"the request body did not arrive within {self.service.config.body_timeout_s:g} s")
            return None
        return body

    def _content_length(self) -> int:
        length = self.headers.get("content-length")
        if length is None:
            self.close_connection = True
            raise BadRequest(411, "a Content-Length header is required")
        try:
            value = int(length)
        except ValueError:
            value = -1
        if value < 0:
            self.close_connection = True
            raise BadRequest(400, f"bad Content-Length {length!r}: expected a byte count >= 0")
        return value

    def _refuse_large_header(self, length: int) -> None:
        """A safetensors header longer than any request within the prompt limits can have (a 20 MB
        prompt) is refused from its first 8 bytes, before the body is read into memory."""
        prefix = self.rfile.peek(8)[:8] if length >= 8 else b""
        limit = self.service.config.prompt_limits.max_header_bytes
        if len(prefix) == 8 and header_size(prefix) > limit:
            self._discard_body()
            raise BadRequest(413, f"the safetensors header ({header_size(prefix)} bytes) exceeds {limit} bytes: at most "
                                  f"{self.service.config.max_prompts} prompts of {self.service.config.max_prompt_chars} characters")

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
        self.server.deadlines.start(self.connection, self.service.config.body_timeout_s)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 2**20))
                if not chunk:  # the client hung up or ran out of time
                    self.close_connection = True
                    return
                length -= len(chunk)
        finally:
            self.server.deadlines.stop(self.connection)

    def _client_gone(self) -> bool:
        """True when the client closed its side: the socket reads as end-of-file without blocking."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's answer to an unreadable request, as JSON. Only client errors come here, so
        its two 5xx codes become 4xx: an unknown HTTP version (505) and an unknown method (501)."""
        self.close_connection = True
        status = {HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: 400, HTTPStatus.NOT_IMPLEMENTED: 405}.get(code, code)
        self._reply(status, {"error": message or HTTPStatus(code).phrase})

    def _headers_timed_out(self) -> None:
        self.close_connection = True
        self._reply(408, {"error": f"the request headers did not arrive within {self.service.config.header_timeout_s:g} s"})

    def _unauthorized(self) -> None:
        self._reply(401, {"error": "missing or wrong API key: send the header 'Authorization: Bearer <key>'"},
                    {"www-authenticate": "Bearer"})

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header(PROTOCOL_HEADER, PROTOCOL_VERSION)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client left before reading its answer
            self.service.record_abandoned()
            self.close_connection = True
            return
        self.service.record_response(status)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet by default: a busy RL loop would flood the console with access lines."""


class RewardHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them (beyond: 503 and close), a listen
    queue of ``backlog``, and the deadlines that close stalled connections."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = 256, backlog: int = 128, idle_timeout_s: float = 30.0):
        self.request_queue_size = backlog
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.deadlines = Deadlines()
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            accepted = self._open < self.max_connections
            self._open += accepted
        if not accepted:
            return self._refuse(request)
        self.deadlines.start(request, self.idle_timeout_s)
        try:
            super().process_request(request, client_address)
        except Exception:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.deadlines.stop(request)
            self._closed_one()

    def _closed_one(self) -> None:
        with self._open_lock:
            self._open -= 1

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"too many open connections (limit {self.max_connections}); retry later"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "retry-after: 1\r\nconnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error of ours
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.close()


def make_server(service: RewardService, host: str = "127.0.0.1", port: int = 0) -> RewardHTTPServer:
    """A threaded HTTP server on (host, port) with the service's limits; port 0 picks a free one (``server.server_address``)."""
    handler = type("Handler", (RewardRequestHandler,), {"service": service})
    config = service.config
    return RewardHTTPServer((host, port), handler, max_connections=config.max_connections, backlog=config.backlog,
                            idle_timeout_s=config.idle_timeout_s)


def load_service(config: ServeConfig) -> RewardService:
    config.validate()
    scorer = Scorer.from_pretrained(
        config.reward, config.model, device=config.device, dtype=DTYPES[config.dtype], max_sequence_length=config.max_sequence_length,
        autocast=config.autocast or None, compile=config.compile, text_encoders=config.text_encoders,
    )
    return RewardService(scorer, config)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    service = load_service(config)
    server = make_server(service, config.host, config.port)
    host, port = server.server_address[:2]
    print(f"dina-lrm reward server on http://{host}:{port} (POST /v1/score; GET /healthz /v1/metadata /v1/metrics)", flush=True)
    print(json.dumps({k: v for k, v in asdict(config).items() if k not in ("reward", "model", "api_key")}), flush=True)
    if not is_loopback(config.host) and not service.api_key:
        print(f"WARNING: serving on {config.host} without an API key: anyone who reaches this address can use the server. "
              f"Set --api-key or ${API_KEY_ENV}.", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
