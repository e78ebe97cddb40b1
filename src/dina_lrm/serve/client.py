"""A small blocking client for ``dina-lrm serve`` (one keep-alive connection; use one per thread)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import torch

from dina_lrm.serve.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, encode_request


class RewardServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"reward server answered HTTP {status}: {message}")
        self.status = status


class RewardClient:
    def __init__(self, url: str, timeout: float = 120.0, api_key: str | None = None):
        """``url``: the server's base address, e.g. ``http://127.0.0.1:8000``; ``api_key``: the server's
        ``--api-key``, sent as a bearer token."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://host:port address, got {url!r}")
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def score(self, latents: torch.Tensor, **fields) -> dict:
        """POST /v1/score; ``fields`` as :func:`dina_lrm.serve.protocol.encode_request` takes them."""
        return self.post(encode_request(latents, **fields))

    def post(self, body: bytes, path: str = "/v1/score") -> dict:
        headers = {"content-type": "application/octet-stream", PROTOCOL_HEADER: PROTOCOL_VERSION}
        return self._request("POST", path, body, headers)

    def metadata(self) -> dict:
        return self._request("GET", "/v1/metadata")

    def metrics(self) -> dict:
        return self._request("GET", "/v1/metrics")

    def healthy(self) -> bool:
        try:
            return self._request("GET", "/healthz").get("status") == "ok"
        except (OSError, RewardServerError):
            return False

    def close(self) -> None:
        self._connection.close()

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        try:
            self._connection.request(method, path, body=body, headers={**(headers or {}), **self._auth})
            response = self._connection.getresponse()
            payload = response.read()
        except (http.client.HTTPException, ConnectionError):
            self._connection.close()  # the server closed the connection (e.g. after a 413): reconnect next time
            raise
        if response.getheader("connection", "").lower() == "close":
            self._connection.close()
        result = json.loads(payload)
        if response.status != 200:
            raise RewardServerError(response.status, result.get("error", ""))
        return result
