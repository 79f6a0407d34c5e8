"""A server of the tests' tiny runs on a loopback port (`python -m petl_modules.serve`), and the clips they send."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf


def wav_bytes(seconds: float = 1.0, seed: int = 0, sample_rate: int = 16000) -> bytes:
    """A 16-bit WAV of Gaussian noise."""
    buffer = io.BytesIO()
    samples = np.random.default_rng(seed).normal(0, 0.1, int(sample_rate * seconds)).astype("float32")
    sf.write(buffer, samples, sample_rate, format="WAV")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """A running server process: its address, first console line and log file."""

    def __init__(self, process: subprocess.Popen, url: str, banner: str, log: Path) -> None:
        self.process, self.url, self.banner, self.log = process, url, banner, log

    def rss_mb(self) -> float:
        """The server process's resident memory (MB), from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@contextmanager
def serving(tasks: dict[str, Path], *options: str, log: Path) -> Iterator[LiveServer]:
    """`python -m petl_modules.serve` on `tasks` and a free loopback port, once /health answers; stopped after."""
    port = free_port()
    command = [sys.executable, "-m", "petl_modules.serve", f"--port={port}", *options]
    command += [f"--task={name}={folder}" for name, folder in tasks.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        banner = process.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-2000:]
                time.sleep(0.2)
        yield LiveServer(process, url, banner, log)
    finally:
        process.terminate()
        process.wait(timeout=30)
