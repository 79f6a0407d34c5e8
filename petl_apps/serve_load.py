"""Load a running server (`python -m petl_modules.serve`): requests per second and latency at several concurrencies.

    python -m petl_apps.serve_load --url http://127.0.0.1:8000 --audio CLIP.wav [--tasks t1,t2 | all]
        [--concurrency 1,4,16] [--requests 200] [--warmup 20] [--json OUT.json]

For each concurrency C, C clients send `--requests` classification requests in all (the tasks in turn), each
client its next request as soon as its previous one is answered, after `--warmup` requests that are not counted.
Each client keeps one connection open and sends requests built once (asyncio streams, no HTTP library on the
hot path), so that the client takes little of the CPU it may share with the server.
Reported per C: requests per second (answered requests over the wall time), the 50th and 99th percentile of the
latency (request sent to answer read), and the requests not answered with 200 (there should be none). Run it
against a server with dynamic batching and one started with `--max_batch_size 1` to see what batching buys.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from petl_modules.atomic import write_json_atomic


class LoadError(ValueError):
    """A bad option or an unreachable server; the message says which."""


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def classify_request(host: str, audio: bytes, task: str) -> bytes:
    """The bytes of one `POST /v1/classify` (multipart: `file`, `task`), built once and sent as often as needed."""
    boundary = "petl-load-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\n{task}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(connection: list, address: tuple[str, int], request: bytes) -> int:
    """Send `request` on the kept-alive `connection` ([reader, writer], opened when empty); the answer's status."""
    if not connection:
        connection.extend(await asyncio.open_connection(*address))
    reader, writer = connection
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    length = re.search(r"content-length: *(\d+)", head)
    await reader.readexactly(int(length.group(1)) if length else 0)
    if "connection: close" in head:
        writer.close()
        connection.clear()
    return int(head.split(" ", 2)[1])


async def _load(url: str, audio: bytes, tasks: Sequence[str], concurrency: int, requests: int, warmup: int) -> dict:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadError(f"--url {url}: give http://HOST:PORT")
    address = (parts.hostname, parts.port or 80)
    prepared = [classify_request(parts.netloc, audio, task) for task in tasks]
    counter = iter(range(warmup + requests))
    latencies, failures = [], 0
    started = None

    async def client_loop() -> None:
        nonlocal failures, started
        connection: list = []
        try:
            for index in counter:
                if index == warmup:
                    started = time.perf_counter()
                sent = time.perf_counter()
                try:
                    status = await _exchange(connection, address, prepared[index % len(prepared)])
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                    status = 0  # no answer: a failed request; the next one opens a new connection
                    if connection:
                        connection[1].close()
                        connection.clear()
                if index >= warmup:
                    latencies.append(time.perf_counter() - sent)
                    failures += status != 200
        finally:
            if connection:
                connection[1].close()

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
    try:
        rows = load(args.url, audio, tasks, concurrencies, args.requests, args.warmup)
    except LoadError as error:
        print(f"serve_load: error: {error}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        write_json_atomic(args.json, {"command": sys.argv, "url": args.url, "tasks": tasks, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
