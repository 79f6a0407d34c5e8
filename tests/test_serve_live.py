"""The server as users run it (`python -m petl_modules.serve` on a loopback port): the command and the load
client, the page in a real headless browser, and thousands of requests mixing tasks, bad inputs and clients that
hang up mid-upload.

The browser test needs Chromium, its driver and selenium (`.ci/run` installs them: apt's `chromium` and
`chromium-driver`); without them it is skipped here and fails where `PETL_BROWSER_TESTS=required` (CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import time

import httpx
import numpy as np
import pytest
from serve_helpers import serving, wav_bytes
from trained_runs import manifest_items, trained_run

from petl_apps import serve_load
from petl_modules import classify


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {method: trained_run(tmp_path_factory, method) for method in ("lora", "adapter")}


# Limits for the load below: long queues and batches, uploads up to 20 MB (the default), audio up to 30 s.
SETTINGS = ("--max_batch_size=32", "--max_wait_ms=5", "--max_queue=10000", "--max_seconds=30")


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """One server for the module's tests (starting one takes seconds); its log is checked by the last test."""
    with serving(runs, *SETTINGS, log=tmp_path_factory.mktemp("server") / "server.log") as live:
        yield live


def test_the_command_serves_on_the_loopback(server, tmp_path):
    """/health, a classification and the load client against the command's server."""
    files = {"file": ("clip.wav", wav_bytes(), "audio/wav")}
    answer = httpx.post(f"{server.url}/v1/classify", files=files, data={"task": "lora"}, timeout=60)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes())
    load = ["--url", server.url, "--audio", str(clip), "--concurrency", "1,4"]
    assert serve_load.main([*load, "--requests", "12", "--warmup", "2", "--json", str(tmp_path / "load.json")]) == 0
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    health = httpx.get(f"{server.url}/health")
    assert server.banner.startswith(f"serving 2 task(s) on {server.url}/")
    assert health.json() == {"status": "ok", "tasks": 2}
    assert answer.status_code == 200 and answer.json()["results"][0]["task"] == "lora"
    assert [(row["concurrency"], row["requests"], row["failed"]) for row in rows] == [(1, 12, 0), (4, 12, 0)]
    assert all(row["requests_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0 for row in rows)


# --- the page ----------------------------------------------------------------------------------------------


def test_the_page_loads_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"https?://|//[a-z]|\bsrc=|@import|url\(", page.text)  # no external or linked asset


def browser():
    """Headless Chromium with a fake microphone (a beep), its console kept; skipped or failed when missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium")
    if missing:
        message = (
            f"the page test needs {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        )
        if os.environ.get("PETL_BROWSER_TESTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def shown_results(driver) -> dict[str, list[tuple[str, str]]]:
    """The page's bars: task -> [(label, score text), ...] in the order shown."""
    from selenium.webdriver.common.by import By

    shown = {}
    for section in driver.find_elements(By.CSS_SELECTOR, "#results section.task"):
        labels = [element.text for element in section.find_elements(By.CLASS_NAME, "label")]
        scores = [element.text for element in section.find_elements(By.CLASS_NAME, "score")]
        shown[section.find_element(By.TAG_NAME, "h2").text] = list(zip(labels, scores))
    return shown


def test_the_page_in_a_browser_classifies_an_upload_and_a_recording(runs, server):
    """Upload a clip with task `all`: every task's top labels as bars, the numbers of `classify --json`; then
    one task and a recording from the (fake) microphone; nothing in the browser's console but our own log."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    clip = manifest_items(runs["lora"])[0][0]
    expected = {
        name: [(e["label"], f"{e['score']:.3f}") for e in classify.classify(str(folder), [clip], top_k=3)[0]["top_k"]]
        for name, folder in runs.items()
    }
    driver = browser()
    try:
        driver.get(f"{server.url}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "task")).options) == 3)
        summary = driver.find_element(By.ID, "summary").text
        top_k = driver.find_element(By.ID, "top_k")
        top_k.clear()
        top_k.send_keys("3")
        driver.find_element(By.ID, "file").send_keys(clip)
        wait.until(lambda d: d.find_element(By.ID, "status").text.endswith(": done"))
        uploaded = shown_results(driver)
        widths = [e.get_attribute("style") for e in driver.find_elements(By.CSS_SELECTOR, "#results .fill")]

        Select(driver.find_element(By.ID, "task")).select_by_value("adapter")
        driver.find_element(By.ID, "record").click()
        wait.until(lambda d: d.find_element(By.ID, "record").text == "Stop")
        time.sleep(1.5)
        driver.find_element(By.ID, "record").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "recording.wav: done")
        recorded = shown_results(driver)
        console = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    finally:
        driver.quit()
    assert summary == "2 task(s) on one ast backbone"
    assert uploaded == expected
    assert len(widths) == 6 and all(re.fullmatch(r"width: \d+(\.\d)?%;", width) for width in widths)
    assert list(recorded) == ["adapter"] and len(recorded["adapter"]) == 3
    assert console == []


# --- under load ------------------------------------------------------------------------------------------


async def hang_up_mid_upload(url: str) -> None:
    """A client that announces a 1 MB multipart upload, sends 64 KB of it and closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {2**20}\r\n\r\n"
    ).encode()
    writer.write(head + start + wav_bytes(2.0)[: 64 * 2**10])
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def test_thousands_of_requests_with_bad_inputs_and_hang_ups(runs, server, tmp_path):
    """2,400 requests from 32 concurrent clients on a live server: both tasks and `all`, and one in ten bad
    (0 bytes, random bytes, a cut WAV header, a 10-minute file, a 100 MB upload, a wrong field, an unknown task)
    plus clients that hang up mid-upload. Every good request gets its clip's own scores (those of
    `classify --json`), every bad one its status; the server answers after, holds no more open files than
    before, and its memory after the warm-up round stays flat over two more rounds."""
    rng = np.random.default_rng(0)
    clips = [tmp_path / f"clip{i}.wav" for i in range(5)]
    for i, path in enumerate(clips):
        path.write_bytes(wav_bytes(0.3 + 0.1 * i, seed=i))
    expected = {
        name: [[e["score"] for e in record["top_k"]] for record in classify.classify(str(folder), map(str, clips))]
        for name, folder in runs.items()
    }
    bad = [
        ({"file": b""}, {"task": "lora"}, 400),
        ({"file": bytes(rng.integers(0, 256, 5000, dtype=np.uint8))}, {"task": "adapter"}, 400),
        ({"file": wav_bytes()[:30]}, {"task": "all"}, 400),
        ({"file": wav_bytes(600.0)}, {"task": "lora"}, 413),  # 10 minutes (19.2 MB: under the upload limit)
        ({"file": b"\0" * (100 * 2**20)}, {"task": "lora"}, 413),  # 100 MB
        ({"audio": wav_bytes()}, {"task": "lora"}, 422),  # the wrong field
        ({"file": wav_bytes()}, {"task": "nope"}, 404),
    ]

    def plan(count: int, seed: int) -> list:
        order = random.Random(seed)
        requests = []
        for i in range(count):
            if i % 10 == 9:
                requests.append(bad[(i // 10) % len(bad)])
            else:
                index = order.randrange(len(clips))
                task = order.choice(("lora", "adapter", "all"))
                requests.append(({"file": clips[index].read_bytes()}, {"task": task}, 200, index))
        return requests

    async def round_of(url: str, requests: list) -> list:
        semaphore = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(request):
                files, form = request[0], request[1]
                async with semaphore:
                    uploads = {field: ("clip.wav", data, "audio/wav") for field, data in files.items()}
                    return await client.post("/v1/classify", files=uploads, data=form)

            hang_ups = [hang_up_mid_upload(url) for _ in range(len(requests) // 50)]
            answers = await asyncio.gather(*(one(request) for request in requests), *hang_ups)
        return answers[: len(requests)]

    def check(requests: list, answers: list) -> None:
        for request, answer in zip(requests, answers):
            assert answer.status_code == request[2], (request[1], answer.text)
            if request[2] != 200:
                assert list(answer.json()) == ["error"]
                continue
            results = answer.json()["results"]
            names = ["lora", "adapter"] if request[1]["task"] == "all" else [request[1]["task"]]
            assert [result["task"] for result in results] == names
            for result in results:
                scores = [entry["score"] for entry in result["labels"]]
                assert scores == pytest.approx(expected[result["task"]][request[3]], abs=1e-5)

    files_before = server.open_files()
    memory = []
    for seed, count in enumerate((400, 1000, 1000)):
        requests = plan(count, seed)
        check(requests, asyncio.run(round_of(server.url, requests)))
        memory.append(server.rss_mb())
    time.sleep(0.5)  # the last connections close
    files_after = server.open_files()
    health = httpx.get(f"{server.url}/health").json()
    metrics = httpx.get(f"{server.url}/metrics").text
    log = server.log.read_text()
    assert health == {"status": "ok", "tasks": 2}
    assert files_after <= files_before, (files_before, files_after)
    assert max(memory[1:]) - memory[0] < 25, memory  # MB; keeping one batch's features per batch adds 33 per round
    assert "Traceback" not in log, log[-3000:]
    answered = float(metrics.split('petl_requests_total{path="/v1/classify",status="200"} ')[1].split()[0])
    assert answered >= 2160  # this test's good requests (and the module's earlier ones)
