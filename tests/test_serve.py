"""The HTTP reward server on loopback, with a tiny model: round trips, micro-batching, bad requests."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from helpers import make_latents, tiny_config
from safetensors.torch import save as save_tensors

from dina_lrm.serve.client import RewardClient, RewardServerError
from dina_lrm.serve.server import ServeConfig, load_service, make_server

MAX_REQUEST_MB = 0.5


@pytest.fixture(scope="module")
def server(reward_dir, pipeline_dir):
    config = ServeConfig(reward=str(reward_dir), model=str(pipeline_dir), max_batch_size=8, max_wait_ms=200, max_request_mb=MAX_REQUEST_MB)
    service = load_service(config)
    httpd = make_server(service)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield service, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    service.close()


def embeds(service, prompts):
    return service.scorer.prompt_encoder(prompts)


def in_process(service, latents, prompts, seeds, **knobs):
    states, pooled = embeds(service, prompts)
    return service.scorer.score(latents=latents, prompt_embeds=states, pooled_prompt_embeds=pooled, seeds=seeds, **knobs)


def test_round_trip_equals_the_in_process_scorer(server):
    service, url = server
    latents, prompts = make_latents(3), ["a red circle", "a blue square", "a red circle"]
    states, pooled = embeds(service, prompts)
    reply = RewardClient(url).score(latents, prompt_embeds=states, pooled_prompt_embeds=pooled, u=0.4, seeds=[1, 2, 3])
    expected = in_process(service, latents, prompts, [1, 2, 3], u=0.4)
    assert reply["protocol_version"] == "1"
    torch.testing.assert_close(torch.tensor(reply["raw_scores"]), expected.raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(reply["normalized_scores"]), (torch.tensor(reply["raw_scores"]) + 10) / 10)
    sigma = expected.sigmas[0].item()
    assert reply["sigmas"] == [[pytest.approx(sigma)]] * 3
    assert reply["thurstone_std"] == [[pytest.approx((2 * sigma**2 + 0.05) ** 0.5)]] * 3


def test_prompts_in_metadata_equal_prompt_embeddings(server):
    _, url = server
    client, latents = RewardClient(url), make_latents(2, seed=4)
    prompts = ["a green triangle", "two circles"]
    by_text = client.score(latents, prompts=prompts, seeds=[5, 6], noise_levels=[0.2, 0.6], n_draws=2)
    states, pooled = embeds(server[0], prompts)
    by_embeds = client.score(latents, prompt_embeds=states, pooled_prompt_embeds=pooled, seeds=[5, 6], noise_levels=[0.2, 0.6], n_draws=2)
    assert by_text["raw_scores"] == pytest.approx(by_embeds["raw_scores"], abs=1e-5)
    assert len(by_text["sigmas"][0]) == 2


def test_verl_omni_client_payload_is_understood(server):
    """The exact request verl-omni's latent_http_scorer_client sends: one item, u (1,), seeds (1,)."""
    service, url = server
    latent, prompt = make_latents(1, seed=9), "a yellow star"
    states, pooled = embeds(service, [prompt])
    body = save_tensors({
        "latents": latent.contiguous(), "prompt_embeds": states.contiguous(), "pooled_prompt_embeds": pooled.contiguous(),
        "u": torch.tensor([0.4], dtype=torch.float32), "seeds": torch.tensor([7], dtype=torch.int64),
    })
    request = urllib.request.Request(url + "/v1/score", data=body, method="POST",
                                     headers={"content-type": "application/octet-stream", "x-drm-protocol-version": "1"})
    with urllib.request.urlopen(request) as response:
        result = json.loads(response.read())
    assert result["protocol_version"] == "1" and len(result["raw_scores"]) == 1
    expected = in_process(service, latent, [prompt], [7], u=0.4).raw
    assert result["raw_scores"][0] == pytest.approx(float(expected[0]), abs=1e-5)


def test_concurrent_requests_are_merged_and_score_as_sequential_calls(server):
    service, url = server
    before = {int(k): v for k, v in RewardClient(url).metrics()["batch_size_histogram"].items()}
    clients, prompts = 6, ["a red circle", "a blue square", "a green triangle"]
    latents = make_latents(clients, seed=2)
    states, pooled = embeds(service, [prompts[i % 3] for i in range(clients)])
    barrier, replies = threading.Barrier(clients), [None] * clients

    def call(i):
        client = RewardClient(url)
        barrier.wait()
        replies[i] = client.score(latents[i : i + 1], prompt_embeds=states[i : i + 1], pooled_prompt_embeds=pooled[i : i + 1],
                                  u=0.4, seeds=[100 + i])["raw_scores"][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = {int(k): v for k, v in RewardClient(url).metrics()["batch_size_histogram"].items()}
    new_passes = {size: after[size] - before.get(size, 0) for size in after if after[size] > before.get(size, 0)}
    assert sum(size * count for size, count in new_passes.items()) == clients
    assert max(new_passes) > 1, f"no request was batched with another: {new_passes}"
    for i in range(clients):
        alone = in_process(service, latents[i : i + 1], [prompts[i % 3]], [100 + i], u=0.4).raw[0]
        assert replies[i] == pytest.approx(float(alone), abs=1e-5)


def good_request(service, batch=1):
    states, pooled = embeds(service, ["a red circle"] * batch)
    return dict(latents=make_latents(batch), prompt_embeds=states, pooled_prompt_embeds=pooled)


def with_fields(service, **changes):
    fields = {**good_request(service, batch=2), **changes}
    return save_tensors({k: v.contiguous() for k, v in fields.items() if v is not None})


BAD_REQUESTS = {
    "malformed safetensors": (400, lambda s: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"),
    "empty body": (400, lambda s: b""),
    "missing latents": (400, lambda s: with_fields(s, latents=None)),
    "missing text": (400, lambda s: with_fields(s, prompt_embeds=None)),
    "unknown field": (400, lambda s: with_fields(s, latent=torch.zeros(1))),
    "latents of rank 3": (422, lambda s: with_fields(s, latents=torch.zeros(4, 8, 8))),
    "wrong latent channels": (422, lambda s: with_fields(s, latents=torch.zeros(2, 16, 8, 8))),
    "odd latent size": (422, lambda s: with_fields(s, latents=torch.zeros(2, 4, 7, 8))),
    "integer latents": (422, lambda s: with_fields(s, latents=torch.zeros(2, 4, 8, 8, dtype=torch.int32))),
    "NaN latents": (422, lambda s: with_fields(s, latents=torch.full((2, 4, 8, 8), float("nan")))),
    "batch mismatch": (422, lambda s: with_fields(s, pooled_prompt_embeds=torch.zeros(3, 64))),
    "wrong text width": (422, lambda s: with_fields(s, prompt_embeds=torch.zeros(2, 5, 7))),
    "u out of range": (422, lambda s: with_fields(s, u=torch.tensor([1.5]))),
    "float seeds": (422, lambda s: with_fields(s, seeds=torch.tensor([0.5, 1.5]))),
    "too many draws": (422, lambda s: with_fields(s, n_draws=torch.tensor([10_000]))),
    "oversized": (413, lambda s: with_fields(s, latents=torch.zeros(2, 4, 128, 256))),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, case):
    service, url = server
    status, make_body = BAD_REQUESTS[case]
    client = RewardClient(url)
    with pytest.raises(RewardServerError) as err:
        client.post(make_body(service))
    assert err.value.status == status, str(err.value)
    assert len(RewardClient(url).score(**good_request(service))["raw_scores"]) == 1


def test_protocol_version_path_and_missing_length(server):
    service, url = server
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("POST", "/v1/score", body=with_fields(service), headers={"x-drm-protocol-version": "2"})
    assert connection.getresponse().status == 400
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("POST", "/v2/score", body=b"x")
    assert connection.getresponse().status == 404
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 411")
    assert RewardClient(url).healthy()


def test_a_failure_inside_scoring_is_a_500_for_that_request_only(server, monkeypatch):
    service, url = server
    monkeypatch.setattr(service.scorer, "score", lambda **kw: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RewardServerError, match="device lost") as err:
        RewardClient(url).score(**good_request(service))
    assert err.value.status == 500
    monkeypatch.undo()
    assert len(RewardClient(url).score(**good_request(service))["raw_scores"]) == 1


def test_health_metadata_and_metrics(server):
    service, url = server
    client = RewardClient(url)
    assert client.healthy()
    meta = client.metadata()
    assert meta["protocol_version"] == "1" and meta["version"] == "0.1.0"
    assert meta["inputs"]["latent_channels"] == 4 and meta["inputs"]["prompt_embeds_width"] == 32
    assert meta["score_scale"]["normalized"] == "(raw + 10) / 10"
    sigma = float(service.scorer.sigma_table.snap(torch.tensor([0.4]))[0])
    assert meta["score_scale"]["thurstone_std_at_default_u"] == pytest.approx((2 * sigma**2 + 0.05) ** 0.5)
    assert meta["model_config"]["model"]["num_transformer_layers"] == tiny_config().model.num_transformer_layers
    assert client.metrics()["items_scored"] >= 0


def test_cli_serve_starts_answers_and_refuses_a_bad_reward_dir(reward_dir, pipeline_dir, tmp_path, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dina_lrm", "serve", "--reward", str(reward_dir), "--model", str(pipeline_dir), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = process.stdout.readline()
        assert "reward server on http://" in banner, process.stderr.read() if process.poll() is not None else banner
        url = banner.split("on ", 1)[1].split(" ", 1)[0]
        client = RewardClient(url)
        assert client.healthy()
        assert len(client.score(make_latents(2), prompts=["a", "b"], seeds=[0, 1])["raw_scores"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=30)
    from dina_lrm.cli import main

    assert main(["serve", "--reward", str(tmp_path / "nowhere"), "--model", str(pipeline_dir)]) == 2
    assert "reward model directory not found" in capsys.readouterr().err


def test_a_server_without_text_encoders_scores_embeddings_and_refuses_prompts_with_a_400(server, reward_dir, pipeline_dir):
    full, _ = server
    service = load_service(ServeConfig(reward=str(reward_dir), model=str(pipeline_dir), max_wait_ms=1, text_encoders="none"))
    httpd = make_server(service)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert service.scorer.prompt_encoder is None
        latents, prompts = make_latents(2, seed=3), ["a red circle", "a cat"]
        states, pooled = embeds(full, prompts)
        reply = RewardClient(url).score(latents, prompt_embeds=states, pooled_prompt_embeds=pooled, seeds=[1, 2])
        assert reply["raw_scores"] == pytest.approx(in_process(full, latents, prompts, [1, 2]).raw.tolist(), abs=1e-5)
        with pytest.raises(RewardServerError, match="400.*no text encoders.*send prompt_embeds"):
            RewardClient(url).score(latents, prompts=prompts, seeds=[1, 2])
        assert RewardClient(url).metadata()["inputs"]["text_encoders"] == "none"
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()
