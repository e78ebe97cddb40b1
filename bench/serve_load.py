"""Load test of ``dina-lrm serve`` on loopback: N concurrent clients, one item per request.

Side by side, in one run, on the toy world's shipped generator with a DiNa-LRM of the demo's shape
(``--shape toy``, where HTTP dominates a step) or on the mid-size SD3-shaped model of ``midsize.py``
(``--shape mid``, a step of realistic weight):
  * in-process: ``Scorer.score`` on batches of MAX_BATCH items, and one item at a time;
  * the server without micro-batching (``--max-batch-size 1``) and with it.
Each server runs as its own ``dina-lrm serve`` process; the clients are threads of this process,
each with one keep-alive connection, sending REQUESTS requests.

Then the server against careless clients, with its default limits (idle timeout IDLE for the stalled run):
  * many clients at once (32 x 50 requests by default): requests that failed;
  * STALLED connections that send nothing, while one normal client keeps scoring: its latency, and
    how long the server takes to close the stalled ones;
  * one request with a 20 MB prompt: the status, the time to the answer, the server's RSS growth.

    python bench/serve_load.py [--shape toy] [--clients 8] [--requests 40] [--max-batch 8] [--max-wait-ms 5]
                               [--burst-clients 32] [--burst-requests 50] [--stalled 150] [--idle-timeout-s 2] [--no-careless]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dina_lrm import DiNaConfig, DiNaLRM, Scorer
from dina_lrm.pipelines import load_pipeline
from dina_lrm.serve.client import RewardClient, RewardServerError
from dina_lrm_toyworld.demo import DEMO_MODEL
from dina_lrm_toyworld.generator import T5_TOKENS

GENERATOR = Path(__file__).resolve().parents[1] / "src" / "dina_lrm" / "toyworld" / "pretrained"
PROMPTS = ["a red circle", "two blue squares", "a small green triangle on the left", "a big yellow star"]


def build_reward(directory: Path, shape: str) -> tuple[Scorer, Path, tuple[int, ...]]:
    """The reward (saved to ``directory / "reward"``), its generator's directory and the latent shape."""
    if shape == "mid":
        from midsize import LATENT_SHAPE, TAPS, T5_TOKENS as MID_T5_TOKENS, save_pipeline

        generator, tokens, model_config, latent_shape = directory / "generator", MID_T5_TOKENS, TAPS, LATENT_SHAPE
        save_pipeline(generator)
    else:
        generator, tokens, model_config, latent_shape = GENERATOR, T5_TOKENS, DEMO_MODEL, None
    pipe = load_pipeline(generator)
    model = DiNaLRM(DiNaConfig.from_dict({"model": model_config, "data": {"train": {"max_sequence_length": tokens}}}), pipe.transformer)
    model.save_pretrained(directory / "reward")
    latent_shape = latent_shape or (model.base_backbone.latent_channels, 16, 16)
    return Scorer.from_model(model, pipe), generator, latent_shape


def workload(scorer: Scorer, count: int, latent_shape: tuple[int, ...]) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    states, pooled = scorer.prompt_encoder(PROMPTS)
    return [
        {"latents": torch.randn(1, *latent_shape, generator=generator), "prompt_embeds": states[i % 4 : i % 4 + 1],
         "pooled_prompt_embeds": pooled[i % 4 : i % 4 + 1], "u": 0.4, "seeds": [i]}
        for i in range(count)
    ]


def in_process_rate(scorer: Scorer, items: list[dict], batch: int, repeats: int = 3) -> float:
    def run():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            scorer.score(latents=torch.cat([c["latents"] for c in chunk]), prompt_embeds=torch.cat([c["prompt_embeds"] for c in chunk]),
                         pooled_prompt_embeds=torch.cat([c["pooled_prompt_embeds"] for c in chunk]), u=0.4,
                         seeds=[c["seeds"][0] for c in chunk])

    run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return repeats * len(items) / (time.perf_counter() - start)


def start_server(reward_dir: Path, generator: Path, max_batch: int, max_wait_ms: float, *options: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "dina_lrm", "serve", "--reward", str(reward_dir), "--model", str(generator), "--port", "0",
               "--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait_ms), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    banner = process.stdout.readline()
    if "http://" not in banner:
        process.kill()
        raise RuntimeError(f"the server did not start: {banner!r}")
    return process, banner.split("on ", 1)[1].split(" ", 1)[0]


def load_test(url: str, items: list[dict], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock, warmed, go = threading.Lock(), threading.Barrier(clients + 1), threading.Barrier(clients + 1)

    def client(index: int):
        connection = RewardClient(url)
        connection.score(**items[index % len(items)])  # warm the connection and the server
        warmed.wait()
        go.wait()
        mine, failed = [], Counter()
        for n in range(requests):
            sent = time.perf_counter()
            try:
                connection.score(**items[(index * requests + n) % len(items)])
            except (OSError, RewardServerError) as err:
                failed[type(err).__name__] += 1
                continue
            mine.append(time.perf_counter() - sent)
        with lock:
            latencies.extend(mine)
            errors.update(failed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    warmed.wait()
    before = Counter({int(k): v for k, v in RewardClient(url).metrics()["batch_size_histogram"].items()})
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    after = Counter({int(k): v for k, v in RewardClient(url).metrics()["batch_size_histogram"].items()})
    milliseconds = np.array(latencies) * 1000
    return {"requests": len(latencies), "req_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(milliseconds, 50)),
            "p99_ms": float(np.percentile(milliseconds, 99)), "histogram": dict(sorted((after - before).items())), "errors": dict(errors)}


def stalled_run(url: str, items: list[dict], stalled: int, normal_requests: int = 40) -> dict:
    """``stalled`` connections that never send a byte, and one normal client scoring meanwhile; a
    watcher thread notes when the server closes each stalled connection."""
    address = url.removeprefix("http://").split(":")
    connections = [socket.create_connection((address[0], int(address[1]))) for _ in range(stalled)]
    opened, closed_after = time.perf_counter(), []

    def watch():
        with selectors.DefaultSelector() as selector:
            for connection in connections:
                selector.register(connection, selectors.EVENT_READ)
            while len(closed_after) < stalled and time.perf_counter() - opened < 120:
                for key, _ in selector.select(timeout=1.0):
                    if key.fileobj.recv(1) == b"":
                        closed_after.append(time.perf_counter() - opened)
                        selector.unregister(key.fileobj)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client, latencies = RewardClient(url), []
    for n in range(normal_requests):
        sent = time.perf_counter()
        client.score(**items[n % len(items)])
        latencies.append(time.perf_counter() - sent)
    watcher.join()
    for connection in connections:
        connection.close()
    milliseconds = np.array(latencies) * 1000
    return {"stalled": stalled, "closed": len(closed_after), "last_closed_s": max(closed_after, default=float("nan")),
            "p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99))}


def rss_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def big_prompt_run(url: str, pid: int, latents: torch.Tensor, chars: int = 20_000_000) -> dict:
    before = rss_mib(pid)
    started = time.perf_counter()
    try:
        RewardClient(url).score(latents, prompts=["x" * chars])
        status = 200
    except RewardServerError as err:
        status = err.status
    return {"status": status, "seconds": time.perf_counter() - started, "rss_growth_mib": rss_mib(pid) - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "mid"], default="toy")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    parser.add_argument("--no-careless", dest="careless", action="store_false", help="skip the careless-client runs")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--burst-clients", type=int, default=32)
    parser.add_argument("--burst-requests", type=int, default=50, help="per burst client")
    parser.add_argument("--stalled", type=int, default=150)
    parser.add_argument("--idle-timeout-s", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        scorer, generator, latent_shape = build_reward(Path(tmp), args.shape)
        reward_dir = Path(tmp) / "reward"
        items = workload(scorer, 64, latent_shape)
        rows = [("in-process, batch 1", {"req_per_s": in_process_rate(scorer, items, 1)}),
                (f"in-process, batch {args.max_batch}", {"req_per_s": in_process_rate(scorer, items, args.max_batch)})]
        for label, max_batch in (("server, no micro-batching", 1), (f"server, micro-batching ({args.max_batch}, {args.max_wait_ms:g} ms)", args.max_batch)):
            process, url = start_server(reward_dir, generator, max_batch, args.max_wait_ms)
            try:
                rows.append((label, load_test(url, items, args.clients, args.requests)))
            finally:
                process.terminate()
                process.wait()
        if args.careless:
            process, url = start_server(reward_dir, generator, args.max_batch, args.max_wait_ms, "--idle-timeout-s", str(args.idle_timeout_s))
            try:
                burst = load_test(url, items, args.burst_clients, args.burst_requests)
                stalled = stalled_run(url, items, args.stalled)
                big = big_prompt_run(url, process.pid, items[0]["latents"])
            finally:
                process.terminate()
                process.wait()
    print(f"\n{args.clients} concurrent clients x {args.requests} requests, 1 item ({'x'.join(map(str, latent_shape))} latent) per "
          f"request, {args.shape} model, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| {'mode':<40} | items/s | p50 ms | p99 ms | passes by batch size |")
    print(f"|{'-' * 42}|---------|--------|--------|----------------------|")
    for label, row in rows:
        latency = f"{row['p50_ms']:6.1f} | {row['p99_ms']:6.1f}" if "p50_ms" in row else f"{'-':>6} | {'-':>6}"
        histogram = ", ".join(f"{size}: {count}" for size, count in row.get("histogram", {}).items()) or "-"
        print(f"| {label:<40} | {row['req_per_s']:7.1f} | {latency} | {histogram} |")
    batched, served = rows[1][1]["req_per_s"], rows[3][1]["req_per_s"]
    print(f"\nserver with micro-batching / in-process batched: {served / batched:.0%}")
    if not args.careless:
        return
    failed = sum(burst["errors"].values())
    print(f"\nCareless clients (server defaults, idle timeout {args.idle_timeout_s:g} s):\n")
    print("| run | result |\n|---|---|")
    print(f"| {args.burst_clients} clients x {args.burst_requests} requests | {burst['requests']} answered, {failed} failed "
          f"{burst['errors'] or ''}, p50 {burst['p50_ms']:.1f} ms, p99 {burst['p99_ms']:.1f} ms |")
    print(f"| {stalled['stalled']} stalled connections + 1 normal client | {stalled['closed']} closed by the server, the last after "
          f"{stalled['last_closed_s']:.2f} s; the normal client: p50 {stalled['p50_ms']:.1f} ms, p99 {stalled['p99_ms']:.1f} ms |")
    print(f"| one request with a 20 MB prompt | HTTP {big['status']} after {big['seconds']:.2f} s; server RSS "
          f"{big['rss_growth_mib']:+.1f} MiB |")


if __name__ == "__main__":
    main()
