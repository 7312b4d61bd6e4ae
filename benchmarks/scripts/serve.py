"""Load test of `cairn serve` on loopback: 1, 4 and 16 concurrent streaming clients.

    python benchmarks/scripts/serve.py [--run RUN] [--requests 4] [--max-tokens 64] \
        [--json benchmarks/records/serve.json]

Without --run it first trains the model it serves, in a temporary folder: the cpu-10min preset's
architecture (a Llama block of 1.65M parameters on its own 4096-token BPE, context 256) for 30
steps on 1,500 stories of the TinyStories sample; the speed does not depend on how well it writes, since every
request generates exactly --max-tokens tokens (`ignore_eos`).

Two servers run, each in its own process with --max-concurrency 16: batched (every sequence in
flight decoded in one forward pass) and unbatched (--max-batch 1: one sequence at a time, the
others waiting their turn), the side-by-side that says what batching buys; each level runs on one
right after the other, so that both meet the same load from other work on the machine. For each
number of clients, each client sends --requests streaming completions one after the other. Per
level it records requests/s, generated tokens/s in total, time to first token and latency (p50,
p99), the server's peak resident memory (sampled every 50 ms), the mean rows per decode step (from
/health), and the count of 200 and 429 answers. A last level sends 32 clients to the batched server,
twice its --max-concurrency: the excess is refused with 429, and memory stays bounded. --json
(default benchmarks/records/serve.json) is a benchmark record (cairn.bench.record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))  # cairn from this checkout, as the servers it starts
from cairn.bench import record  # noqa: E402
SAMPLE = Path(os.environ.get("CAIRN_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories"))
LEVELS = (1, 4, 16)
MAX_CONCURRENCY = 16


def cairn(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "cairn", *args], env=env, **kw)


def train_model(out: Path) -> Path:
    run = out / "run"
    proc = cairn("train", "--preset", "cpu-10min", "--data", str(SAMPLE), "--n-samples", "1500", "--max-steps", "30",
                 "--time-budget", "",
                 "--compile", "false", "--eval-every", "0", "--end-stories", "0", "--checkpoint-every", "0",
                 "--tokenizer", "bpe:4096", "--out", str(run), "--no-progress",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"training the model to serve failed:\n{err}")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cairn serve` in its own process, with its resident memory sampled every 50 ms."""

    def __init__(self, run: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = cairn("serve", str(run), "--port", str(self.port), "--max-concurrency", str(MAX_CONCURRENCY),
                          "--max-tokens", "4096", "--device", "cpu", *extra, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"cairn serve exited:\n{self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                sys.exit("cairn serve did not answer within 180 s")
            time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def close(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(http: httpx.AsyncClient, url: str, seed: int, max_tokens: int) -> dict:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": 200, "ttft": first - start, "latency": end - start, "tokens": tokens}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> list[dict]:
            return [await one_request(http, url, 1000 * c + i, max_tokens) for i in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def level(server: Server, clients: int, requests: int, max_tokens: int) -> dict:
    before = server.health()
    server.peak = 0
    load_avg = os.getloadavg()[0]
    results, seconds = asyncio.run(load(server.url, clients, requests, max_tokens))
    after = server.health()
    ok = [r for r in results if r["status"] == 200]
    steps = after["decode_steps"] - before["decode_steps"]
    row = {
        "clients": clients, "requests": len(results), "ok_200": len(ok),
        "refused_429": sum(r["status"] == 429 for r in results),
        "other_status": sum(r["status"] not in (200, 429) for r in results),
        "seconds": round(seconds, 3), "requests_per_s": round(len(ok) / seconds, 2),
        "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": round(sum(r["tokens"] for r in ok) / seconds, 1),
        "ttft_p50_s": round(percentile([r["ttft"] for r in ok], 50), 4),
        "ttft_p99_s": round(percentile([r["ttft"] for r in ok], 99), 4),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 50), 4),
        "latency_p99_s": round(percentile([r["latency"] for r in ok], 99), 4),
        "mean_rows_per_decode_step": round((after["decoded_rows"] - before["decoded_rows"]) / max(steps, 1), 2),
        "peak_server_rss_mb": round(server.peak / 2**20, 1),
        "load_avg_1min_before": round(load_avg, 2),
    }
    print(f"  {clients:2d} clients: {row['ok_200']} ok, {row['refused_429']} x 429, {row['tokens_per_s']:8.1f} tok/s, "
          f"{row['requests_per_s']:6.2f} req/s, TTFT p50 {row['ttft_p50_s']:.3f}s p99 {row['ttft_p99_s']:.3f}s, "
          f"latency p50 {row['latency_p50_s']:.2f}s p99 {row['latency_p99_s']:.2f}s, "
          f"batch {row['mean_rows_per_decode_step']}, RSS {row['peak_server_rss_mb']} MB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run (or checkpoint) to serve (default: train the small model described above)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" / "serve.json"))
    a = ap.parse_args()
    recording = record.start()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(a.run) if a.run else train_model(Path(tmp))
        from cairn.checkpoint.load import load as load_run

        loaded = load_run(run, "cpu")
        model = {"config": loaded.config.name, "trained_steps": loaded.meta.get("state", {}).get("step"),
                 "parameters": loaded.model.num_params(), "context_len": loaded.model.cfg.context_len,
                 "tokenizer": loaded.tokenizer.name, "vocab_size": loaded.model.cfg.vocab_size}
        del loaded
        result = {"what": "cairn serve under load on loopback: concurrent streaming clients, each sending "
                          f"{a.requests} completions of {a.max_tokens} tokens one after the other",
                  "model": model,
                  "settings": {"requests_per_client": a.requests, "max_tokens": a.max_tokens, "temperature": 0.8,
                               "max_concurrency": MAX_CONCURRENCY, "prompt": "Once upon a time"}}
        # both servers up at once (the idle one sleeps), each level run on one then the other, so that
        # the two see the machine as alike as can be
        servers = {"batched": Server(run), "unbatched": Server(run, "--max-batch", "1")}
        try:
            for name in servers:
                result[name] = []
            for clients in LEVELS:
                for name, server in servers.items():
                    print(f"{name}:", end="", flush=True)
                    result[name].append(level(server, clients, a.requests, a.max_tokens))
            print("batched, over the concurrency:", end="", flush=True)
            result["overload"] = level(servers["batched"], 2 * MAX_CONCURRENCY, a.requests, a.max_tokens)
            result["servers_crashed"] = [name for name, server in servers.items() if server.proc.poll() is not None]
        finally:
            for server in servers.values():
                server.close()

    def growth(rows: list[dict]) -> float:
        return round(rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)

    result["tokens_per_s_growth_1_to_16_clients"] = {"batched": growth(result["batched"]),
                                                     "unbatched": growth(result["unbatched"])}
    result["batched_over_unbatched_at_16_clients"] = round(
        result["batched"][-1]["tokens_per_s"] / result["unbatched"][-1]["tokens_per_s"], 2)
    result["seconds_total"] = round(time.time() - started, 1)
    # the servers are processes of their own, with their own torch threads: the record's are null
    recording.write(a.json, result, threads=None)
    print(f"tokens/s from 1 to 16 clients: x{result['tokens_per_s_growth_1_to_16_clients']['batched']} batched, "
          f"x{result['tokens_per_s_growth_1_to_16_clients']['unbatched']} unbatched; "
          f"batched / unbatched at 16 clients: x{result['batched_over_unbatched_at_16_clients']}; wrote {a.json}")


if __name__ == "__main__":
    main()
