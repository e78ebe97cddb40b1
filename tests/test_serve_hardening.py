"""The reward server against hostile or careless clients, on loopback: a bounded fuzz run, prompt
limits, deadlines for stalled connections, the connection cap, abandoned requests, the API key."""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import make_latents
from safetensors.torch import save as save_tensors

from dina_lrm.serve import server as server_module
from dina_lrm.serve.client import RewardClient, RewardServerError
from dina_lrm.serve.protocol import encode_request
from dina_lrm.serve.server import API_KEY_ENV, ServeConfig, load_service, make_server

LIMITS = dict(max_request_mb=0.5, max_prompts=8, max_prompt_chars=200, idle_timeout_s=0.5, header_timeout_s=0.5, body_timeout_s=0.5)


def start(service):
    httpd = make_server(service)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@pytest.fixture(scope="module")
def service(reward_dir, pipeline_dir):
    service = load_service(ServeConfig(reward=str(reward_dir), model=str(pipeline_dir), max_wait_ms=1, **LIMITS))
    yield service
    service.close()


@pytest.fixture
def served(service):
    httpd, port = start(service)
    yield service, port, httpd
    httpd.shutdown()
    httpd.server_close()


def strict_json(payload: bytes):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(payload, parse_constant=refuse)


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send raw bytes, read until the server closes or one full response arrived: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            connection.sendall(raw)
        except OSError:
            pass
        received = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0].split(b":")[1]):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post(body: bytes, length: str | None = None, extra: bytes = b"") -> bytes:
    length = str(len(body)) if length is None else length
    return (b"POST /v1/score HTTP/1.1\r\nHost: x\r\ncontent-length: " + length.encode() + b"\r\n" + extra + b"\r\n") + body


def good_fields(service, batch=2, seed=0):
    states, pooled = service.scorer.prompt_encoder(["a red circle"] * batch)
    return dict(latents=make_latents(batch, seed=seed), prompt_embeds=states, pooled_prompt_embeds=pooled)


def tensors_body(**tensors) -> bytes:
    return save_tensors({name: value.contiguous() for name, value in tensors.items()})


def malformed_requests(service, count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` malformed requests drawn from the classes a fuzzer found, each with random details."""
    rng = random.Random(seed)
    fields = good_fields(service)
    good = encode_request(**fields, seeds=[0, 1])

    def nested(depth):
        return "[" * depth + "]" * depth

    makers = {
        "negative length": lambda: post(good[: rng.randint(0, 64)], length=str(-rng.randint(1, 10))),
        "non-numeric length": lambda: post(b"", length=rng.choice(["abc", "1e3", "0x10", ""])),
        "empty spatial size": lambda: post(tensors_body(**{**fields, "latents": torch.zeros(2, 4, 0, rng.choice([0, 8]))})),
        "float8 latents": lambda: post(tensors_body(**{**fields, "latents": fields["latents"].to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2]))})),
        "lone surrogate": lambda: post(encode_request(fields["latents"], prompts=["a red circle", chr(rng.randint(0xD800, 0xDFFF))])),
        "deeply nested prompts": lambda: post(save_tensors({"latents": fields["latents"]}, metadata={"prompts": nested(rng.randint(2_000, 15_000))})),
        "huge latents": lambda: post(tensors_body(**{**fields, "latents": torch.full((2, 4, 8, 8), rng.choice([3e38, -3e38, 1e30]))})),
        "too many prompts": lambda: post(encode_request(make_latents(9), prompts=["a"] * 9)),
        "too long prompt": lambda: post(encode_request(make_latents(2), prompts=["a", "red " * rng.randint(51, 400)])),
        "random bytes": lambda: post(rng.randbytes(rng.randint(1, 4096))),
        "flipped bytes": lambda: post(bytes(b ^ (1 << rng.randint(0, 7)) if rng.random() < 0.02 else b for b in good)),
        "header length past the body": lambda: post(good[:8] + good[8 : rng.randint(9, 200)]),
        "bad metadata": lambda: post(save_tensors({"latents": fields["latents"]}, metadata={"prompts": rng.choice(["{", "[1, 2]", "null", '"x"'])})),
        "wrong protocol": lambda: post(good, extra=b"x-drm-protocol-version: " + str(rng.randint(2, 99)).encode() + b"\r\n"),
        "bad request line": lambda: rng.choice([b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\xff\r\n\r\n"]),
        "unknown path": lambda: rng.choice([b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", post(good).replace(b"/v1/score", b"/v1/scor")]),
    }
    names = sorted(makers)
    return [(name, makers[name]()) for name in (names[i % len(names)] for i in range(count))]


def score_of(port: int, service) -> float:
    return RewardClient(f"http://127.0.0.1:{port}").score(**good_fields(service, seed=3), seeds=[11, 12], u=0.4)["raw_scores"]


def test_fuzz_no_5xx_strict_json_and_the_same_score_after(served):
    service, port, _ = served
    before = score_of(port, service)
    statuses = {}
    for name, raw in malformed_requests(service, 224):
        status, body = exchange(port, raw)
        assert status < 500, f"{name}: {status} {body[:200]!r}"
        strict_json(body) if body else None
        statuses.setdefault(name, set()).add(status)
    assert score_of(port, service) == before
    assert statuses["negative length"] == {400} and statuses["float8 latents"] == {422} and statuses["empty spatial size"] == {422}
    assert statuses["lone surrogate"] == {422} and statuses["deeply nested prompts"] == {400} and statuses["huge latents"] <= {422}
    assert statuses["too many prompts"] == {413} and statuses["too long prompt"] == {413}


def test_a_negative_length_does_not_wait_for_the_client_to_close(served):
    service, port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(post(b"partial body", length="-1"))
        answer = connection.recv(4096)  # the client never closes: the server must answer anyway
    assert answer.startswith(b"HTTP/1.1 400")


def rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_a_20_mb_prompt_is_refused_without_reading_it_into_memory(reward_dir, pipeline_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dina_lrm", "serve", "--reward", str(reward_dir), "--model", str(pipeline_dir), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = process.stdout.readline().split("on ", 1)[1].split(" ", 1)[0]
        client = RewardClient(url)
        assert len(client.score(make_latents(1), prompts=["a red circle"])["raw_scores"]) == 1
        before = rss_bytes(process.pid)
        with pytest.raises(RewardServerError) as err:
            client.score(make_latents(1), prompts=["x" * 20_000_000])
        assert err.value.status == 413 and "header" in str(err.value)
        assert rss_bytes(process.pid) - before < 50 * 2**20
        assert len(RewardClient(url).score(make_latents(1), prompts=["a red circle"])["raw_scores"]) == 1
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(condition, limit_s: float = 20.0) -> bool:
    """Poll until ``condition()`` (a liveness check with a generous bound, not a speed assertion)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_stalled_connections_are_closed_while_a_normal_client_is_served(served):
    service, port, httpd = served
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    partial_headers = socket.create_connection(("127.0.0.1", port))
    partial_headers.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
    partial_body = socket.create_connection(("127.0.0.1", port))
    partial_body.settimeout(30)
    partial_body.sendall(post(b"\x00" * 10, length="1000"))
    assert len(score_of(port, service)) == 2
    assert wait_for(lambda: httpd.open_connections == 0), f"{httpd.open_connections} connections still open"
    for connection in stalled:
        connection.settimeout(30)
        assert connection.recv(100) == b""  # closed by the server
        connection.close()
    for connection in (partial_headers, partial_body):
        connection.settimeout(30)
        assert connection.recv(100).startswith(b"HTTP/1.1 408")
        connection.close()
    assert len(score_of(port, service)) == 2


def test_connections_beyond_the_cap_get_503(reward_dir, pipeline_dir):
    service = load_service(ServeConfig(reward=str(reward_dir), model=str(pipeline_dir), max_connections=3, idle_timeout_s=60))
    httpd, port = start(service)
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert wait_for(lambda: httpd.open_connections == 3)
        status, body = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "too many open connections" in strict_json(body)["error"]
        for connection in held:
            connection.close()
        assert wait_for(lambda: httpd.open_connections == 0)
        assert RewardClient(f"http://127.0.0.1:{port}").healthy()
        assert httpd.request_queue_size >= 128
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()


def test_a_client_that_leaves_is_not_scored_and_counted_once(served):
    service, port, _ = served
    before = RewardClient(f"http://127.0.0.1:{port}").metrics()
    with service._text_lock:  # hold the request in prompt encoding until its client has left
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(post(encode_request(make_latents(2), prompts=["a red circle", "a blue square"])))
        connection.close()
        time.sleep(0.2)
    metrics_calls = []

    def abandoned():
        metrics_calls.append(1)
        return RewardClient(f"http://127.0.0.1:{port}").metrics()["abandoned"] == before["abandoned"] + 1

    assert wait_for(abandoned)
    # Only the metrics calls are answered: a response is counted once written, so a snapshot may lag
    # the calls before it by a moment, never exceed them.
    answered = []

    def only_metrics_answered():
        after = RewardClient(f"http://127.0.0.1:{port}").metrics()
        counted = {k: v - before["responses"].get(k, 0) for k, v in after["responses"].items()}
        counted = {k: v for k, v in counted.items() if v}
        expected = len(metrics_calls) + len(answered) + 1  # every metrics call before this one, and `before`'s own
        answered.append(1)
        assert after["items_scored"] == before["items_scored"] and set(counted) <= {"200"} and counted.get("200", 0) <= expected
        return counted == {"200": expected}

    assert wait_for(only_metrics_answered)


def test_api_key(reward_dir, pipeline_dir, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    service = load_service(ServeConfig(reward=str(reward_dir), model=str(pipeline_dir)))
    httpd, port = start(service)
    try:
        url = f"http://127.0.0.1:{port}"
        assert RewardClient(url).healthy()  # health checks need no key
        for call in (lambda c: c.metadata(), lambda c: c.score(make_latents(1), prompts=["a"])):
            with pytest.raises(RewardServerError) as err:
                call(RewardClient(url))
            assert err.value.status == 401
            with pytest.raises(RewardServerError):
                call(RewardClient(url, api_key="wrong"))
        client = RewardClient(url, api_key="s3cret")
        assert len(client.score(make_latents(1), prompts=["a"])["raw_scores"]) == 1
        assert client.metadata()["authentication"] == "bearer"
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()


def test_metadata_names_the_models_without_their_paths(served, reward_dir, pipeline_dir):
    _, port, _ = served
    meta = RewardClient(f"http://127.0.0.1:{port}").metadata()
    assert meta["reward"] == Path(reward_dir).name and meta["generator"] == Path(pipeline_dir).name
    assert str(Path(reward_dir).parent) not in json.dumps(meta)


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch, capsys, service):
    class Interrupted:
        server_address = ("0.0.0.0", 1234)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    monkeypatch.setattr(server_module, "load_service", lambda config: type("S", (), {"api_key": "", "close": lambda self: None})())
    monkeypatch.setattr(server_module, "make_server", lambda *args: Interrupted())
    server_module.serve(ServeConfig(reward="r", model="m", host="0.0.0.0"))
    assert "WARNING: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    server_module.serve(ServeConfig(reward="r", model="m", host="127.0.0.1"))
    assert "WARNING" not in capsys.readouterr().err
