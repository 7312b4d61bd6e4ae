"""Soak test of `cairn serve` on loopback: thousands of requests from 16 clients, then nothing in
flight and the server's memory where it was.

    python benchmarks/scripts/serve_soak.py [--run RUN] [--requests 3000] [--clients 16] \
        [--max-tokens 16] [--warmup 320] [--json benchmarks/records/serve-soak.json]

Without --run it first trains the model benchmarks/scripts/serve.py serves (the cpu-10min preset's
architecture, 1.65M parameters, a 4096-token BPE, context 256, 30 steps). The server is
`cairn serve` in its own process with its defaults (--max-concurrency 16). Each client sends one
request after the other; request i is of kind KINDS[i % 5]:

- whole: a completion answered in one JSON body;
- stream: a streamed completion, read to `data: [DONE]`;
- chat: a chat completion (the run's chat template);
- long prompt: a prompt longer than the context (it keeps its end; the sequence decodes past the KV cache);
- dropped: a streamed completion whose client closes the connection after the first chunk.

Every answered request must come back 200 with exactly --max-tokens tokens (`ignore_eos`) and, for a
long prompt, the context's worth of prompt tokens; anything else is an error. A 429 (a dropped
client's slot not yet freed when its next request came) is retried after 50 ms and counted.

A warm-up of --warmup requests comes first; then the server's resident memory (RSS) is read, and
again after each tenth of the soak. At the end /health's in_flight must be 0 and the RSS within 10%
of the RSS after the warm-up. The record (cairn.bench.record) holds the requests, clients, errors,
RSS at the start, after each tenth and at the end, p50/p99 latency of the answered requests, and
the machine's load. The exit code is 1 when a check failed (the record is written all the same).
`soak()` is also what tests/test_serve_faults.py runs, on 200 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx

KINDS = ("whole", "stream", "chat", "long prompt", "dropped")
PROMPTS = ("Once upon a time", "Tom had a red ball", "Lily saw a big dog", "One day, Sam went to the park",
           "The little cat was sad", "Mia and Ben found a box", "There was a tree", "")
RSS_GROWTH = 0.10  # the most the server's memory may grow over the soak, after the warm-up
RETRY_S = 0.05


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one(http: httpx.AsyncClient, url: str, i: int, kind: str, max_tokens: int, long_prompt: str,
              context_len: int) -> tuple[int, Optional[str]]:
    """Send request i of `kind`: its status and what was wrong with the answer (None: nothing)."""
    prompt = long_prompt if kind == "long prompt" else PROMPTS[i % len(PROMPTS)]
    settings = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True}
    if kind == "chat":
        r = await http.post(f"{url}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": prompt or "Tell me a story."}],
                                  **settings})
        return r.status_code, None if r.status_code != 200 else tokens_wrong(r.json(), max_tokens)
    if kind in ("whole", "long prompt"):
        r = await http.post(f"{url}/v1/completions", json={"prompt": prompt, **settings})
        if r.status_code != 200:
            return r.status_code, None
        body = r.json()
        if kind == "long prompt" and body["usage"]["prompt_tokens"] != context_len:
            return 200, f"{body['usage']['prompt_tokens']} prompt tokens, not the context's {context_len}"
        return 200, tokens_wrong(body, max_tokens)
    async with http.stream("POST", f"{url}/v1/completions",
                           json={"prompt": prompt, "stream": True, **settings}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        last: Optional[dict[str, Any]] = None
        async for line in r.aiter_lines():
            if kind == "dropped" and line.startswith("data: {"):
                return 200, None  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                return 200, None if last is None else tokens_wrong(last, max_tokens)
            if line.startswith("data: {"):
                last = json.loads(line[6:])
        return 200, "the stream ended without data: [DONE]"


def tokens_wrong(body: dict[str, Any], max_tokens: int) -> Optional[str]:
    usage = body.get("usage") or {}
    if usage.get("completion_tokens") != max_tokens:
        return f"{usage.get('completion_tokens')} tokens, not {max_tokens}: {json.dumps(body)[:300]}"
    return None


async def soak(url: str, requests: int, clients: int, max_tokens: int, first: int = 0) -> dict[str, Any]:
    """`requests` requests (numbered from `first`, which picks their kinds and seeds) from `clients`
    concurrent clients, each sending its next request when its last one is done."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        context_len = int((await http.get(f"{url}/v1/models")).json()["data"][0]["context_length"])
        long_prompt = " ".join(["Lily and Tom played in the park."] * (context_len // 2))
        queue = iter(range(first, first + requests))
        latencies: list[float] = []
        errors: list[str] = []
        by_kind = {kind: 0 for kind in KINDS}
        counts = {"answered": 0, "dropped": 0, "retried_429": 0}

        async def client() -> None:
            for i in queue:  # one shared iterator: each request is taken by one client
                kind = KINDS[i % len(KINDS)]
                start = time.perf_counter()
                while True:
                    try:
                        status, wrong = await one(http, url, i, kind, max_tokens, long_prompt, context_len)
                    except httpx.HTTPError as e:
                        status, wrong = 0, f"{type(e).__name__}: {e}"
                    if status != 429:
                        break
                    counts["retried_429"] += 1
                    await asyncio.sleep(RETRY_S)
                by_kind[kind] += 1
                if status != 200 or wrong:
                    errors.append(f"request {i} ({kind}): status {status}" + (f", {wrong}" if wrong else ""))
                elif kind == "dropped":
                    counts["dropped"] += 1
                else:
                    counts["answered"] += 1
                    latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"requests": requests, "clients": clients, **counts, "errors": errors, "by_kind": by_kind,
            "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 1), "latencies_s": latencies,
            "latency_p50_s": round(percentile(latencies, 50), 4) if latencies else None,
            "latency_p99_s": round(percentile(latencies, 99), 4) if latencies else None}


def wait_idle(url: str, seconds: float = 30) -> int:
    """/health's in_flight once it is 0, or as it is after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        in_flight = int(httpx.get(f"{url}/health", timeout=30).json()["in_flight"])
        if in_flight == 0 or time.monotonic() > deadline:
            return in_flight
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run (or checkpoint) to serve (default: train serve.py's small model)")
    ap.add_argument("--requests", type=int, default=3000, help="requests of the soak (default 3000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    ap.add_argument("--warmup", type=int, default=320, help="requests before the starting RSS (default 320)")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "records" /
                                          "serve-soak.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # cairn from this checkout
    import psutil
    from serve import Server, train_model  # the load benchmark's server process and model, beside this script

    from cairn.bench import record

    recording = record.start()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(a.run) if a.run else train_model(Path(tmp))
        server = Server(run)
        try:
            ps = psutil.Process(server.proc.pid)

            def rss_mb() -> float:
                return round(ps.memory_info().rss / 2**20, 1)

            warm = asyncio.run(soak(server.url, a.warmup, a.clients, a.max_tokens))
            rss = [rss_mb()]
            load_avg = [round(os.getloadavg()[0], 2)]
            parts = []
            tenth = -(-a.requests // 10)
            for first in range(0, a.requests, tenth):
                n = min(tenth, a.requests - first)
                parts.append(asyncio.run(soak(server.url, n, a.clients, a.max_tokens, first=a.warmup + first)))
                rss.append(rss_mb())
                load_avg.append(round(os.getloadavg()[0], 2))
                print(f"  {first + n:5d} requests: RSS {rss[-1]} MB, {len(parts[-1]['errors'])} errors, "
                      f"p50 {parts[-1]['latency_p50_s']} s, load {load_avg[-1]}", flush=True)
            in_flight = wait_idle(server.url)
            health = server.health()
            crashed = server.proc.poll() is not None
        finally:
            server.close()

    errors = [e for p in parts for e in p["errors"]]
    seconds = sum(p["seconds"] for p in parts)
    latencies = [x for p in parts for x in p["latencies_s"]]
    growth = rss[-1] / rss[0] - 1
    result = {
        "what": "cairn serve soaked on loopback: whole, streamed, chat and past-the-context completions and "
                "streams dropped after their first chunk, from concurrent clients each sending one request "
                "after the other",
        "settings": {"requests": a.requests, "clients": a.clients, "max_tokens": a.max_tokens, "warmup": a.warmup,
                     "kinds": list(KINDS), "max_concurrency": 16, "temperature": 0.8,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")},
        "requests": a.requests, "clients": a.clients,
        "answered": sum(p["answered"] for p in parts), "dropped": sum(p["dropped"] for p in parts),
        "errors": len(errors), "first_errors": errors[:10],
        "retried_429": sum(p["retried_429"] for p in parts),
        "warmup": {k: warm[k] for k in ("requests", "answered", "dropped", "retried_429")} |
                  {"errors": len(warm["errors"])},
        "seconds": round(seconds, 1), "requests_per_s": round(a.requests / seconds, 1),
        "latency_p50_s_per_tenth": [p["latency_p50_s"] for p in parts],
        "latency_p99_s_per_tenth": [p["latency_p99_s"] for p in parts],
        "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p99_s": round(percentile(latencies, 99), 4),
        "rss_mb_start": rss[0], "rss_mb_end": rss[-1], "rss_mb_after_each_tenth": rss[1:],
        "rss_growth": round(growth, 4),
        "in_flight_end": in_flight, "decode_steps": health["decode_steps"], "decoded_rows": health["decoded_rows"],
        "server_crashed": crashed,
        "load_avg_1min_after_each_tenth": load_avg[1:],
        "checks": {"no_errors": not errors, "in_flight_0": in_flight == 0,
                   f"rss_within_{round(RSS_GROWTH * 100)}pct": abs(growth) <= RSS_GROWTH},
    }
    recording.write(a.json, result, threads=None)  # the server is a process of its own
    print(f"{a.requests} requests from {a.clients} clients: {len(errors)} errors, {result['dropped']} dropped, "
          f"{result['retried_429']} retried 429; in_flight at the end {in_flight}; RSS {rss[0]} -> {rss[-1]} MB "
          f"({growth:+.1%}); latency p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s; wrote {a.json}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
