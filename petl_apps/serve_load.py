"""Load a running server (`python -m petl_modules.serve`): requests per second and latency at several concurrencies.

    python -m petl_apps.serve_load --url http://127.0.0.1:8000 --audio CLIP.wav [--tasks t1,t2 | all]
        [--concurrency 1,4,16] [--requests 200] [--warmup 20] [--json OUT.json]

For each concurrency C, C clients send `--requests` classification requests in all (the tasks in turn), each
client its next request as soon as its previous one is answered, after `--warmup` requests that are not counted.
Reported per C: requests per second (answered requests over the wall time), the 50th and 99th percentile of the
latency (request sent to answer read), and the requests not answered with 200 (there should be none). Run it
against a server with dynamic batching and one started with `--max_batch_size 1` to see what batching buys.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from petl_modules.atomic import write_json_atomic


class LoadError(ValueError):
    """A bad option or an unreachable server; the message says which."""


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def _load(url: str, audio: bytes, tasks: Sequence[str], concurrency: int, requests: int, warmup: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        counter = iter(range(warmup + requests))
        latencies, failures = [], 0
        started = None

        async def client_loop() -> None:
            nonlocal failures, started
            for index in counter:
                if index == warmup:
                    started = time.perf_counter()
                sent = time.perf_counter()
                files = {"file": ("clip.wav", audio, "audio/wav")}
                answer = await client.post("/v1/classify", files=files, data={"task": tasks[index % len(tasks)]})
                if index >= warmup:
                    latencies.append(time.perf_counter() - sent)
                    failures += answer.status_code != 200

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - (started or time.perf_counter())
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "failed": failures,
    }


def load(
    url: str, audio: bytes, tasks: Sequence[str], concurrencies: Sequence[int], requests: int, warmup: int
) -> list:
    """One row per concurrency (see the module's docstring)."""
    return [asyncio.run(_load(url, audio, tasks, c, requests, warmup)) for c in concurrencies]


def table(rows: Sequence[dict]) -> str:
    lines = ["| concurrency | requests/s | p50 (ms) | p99 (ms) | failed |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
            f"{row['failed']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m petl_apps.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--audio", required=True, help="the clip every request sends")
    parser.add_argument("--tasks", default=None, help="comma-separated task names, or all (default: the server's)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import httpx

    try:
        concurrencies = [int(item) for item in args.concurrency.split(",") if item.strip()]
        if not concurrencies or min(concurrencies) < 1 or args.requests < 1 or args.warmup < 0:
            raise ValueError
    except ValueError:
        print("serve_load: error: --concurrency takes positive integers, --requests >= 1, --warmup >= 0",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        audio = Path(args.audio).read_bytes()
        tasks = args.tasks.split(",") if args.tasks else [t["name"] for t in httpx.get(f"{args.url}/v1/tasks").json()]
    except (OSError, httpx.HTTPError) as error:
        print(f"serve_load: error: {error}", file=sys.stderr)
        return 2
    rows = load(args.url, audio, tasks, concurrencies, args.requests, args.warmup)
    print(table(rows))
    if args.json:
        write_json_atomic(args.json, {"command": sys.argv, "url": args.url, "tasks": tasks, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
