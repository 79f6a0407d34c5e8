"""The HTTP server: its API on two tasks sharing a tiny AST, dynamic batching, errors and limits, task loading.

Requests go through httpx's ASGI transport (no socket), concurrently where batching is tested; the server on a
socket, its page in a browser and longer loads are in `test_serve_live.py`.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from serve_helpers import wav_bytes
from trained_runs import manifest_items, trained_run

from petl_modules import classify
from petl_modules.multitask import MultiTaskClassifier
from petl_modules.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {method: trained_run(tmp_path_factory, method) for method in ("lora", "adapter")}


def make_app(runs, **settings):
    classifier = MultiTaskClassifier()
    for name, folder in runs.items():
        classifier.add_task(name, folder)
    return create_app(classifier, ServeSettings(**settings))


async def post(client, data: bytes | None, **form):
    files = {"file": ("clip.wav", data, "audio/wav")} if data is not None else None
    return await client.post("/v1/classify", files=files, data=form)


def run(app, scenario):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await scenario(client)

    return asyncio.run(main())


def test_health_tasks_and_metrics(runs):
    app = make_app(runs)

    async def scenario(client):
        health = (await client.get("/health")).json()
        tasks = (await client.get("/v1/tasks")).json()
        await post(client, wav_bytes(), task="lora")
        metrics = (await client.get("/metrics")).text
        return health, tasks, metrics

    health, tasks, metrics = run(app, scenario)
    assert health == {"status": "ok", "tasks": 2}
    assert [(t["name"], t["method"], t["backbone"]) for t in tasks] == [
        ("lora", "lora", "ast"),
        ("adapter", "adapter", "ast"),
    ]
    assert all(t["classes"] and t["trainable_params"] > 0 for t in tasks)
    assert 'petl_requests_total{path="/v1/classify",status="200"} 1.0' in metrics
    assert "petl_batch_size_count 1.0" in metrics and "petl_inference_seconds_count 1.0" in metrics


def test_scores_are_those_of_classify_json_and_all_tasks_answer(runs):
    files = [path for path, _ in manifest_items(runs["lora"])][:2]
    app = make_app(runs)

    async def scenario(client):
        return [(await post(client, open(path, "rb").read(), task="all", top_k="3")).json() for path in files]

    answers = run(app, scenario)
    for name, folder in runs.items():
        expected = classify.classify(str(folder), files, top_k=3, device="cpu")
        for answer, record in zip(answers, expected):
            (result,) = [r for r in answer["results"] if r["task"] == name]
            assert [e["label"] for e in result["labels"]] == [e["label"] for e in record["top_k"]]
            assert [e["score"] for e in result["labels"]] == pytest.approx(
                [e["score"] for e in record["top_k"]], abs=1e-5
            )


def test_concurrent_requests_of_both_tasks_share_batches(runs):
    app = make_app(runs, max_batch_size=16, max_wait_ms=200)

    async def scenario(client):
        requests = [post(client, wav_bytes(0.5 + 0.1 * i, seed=i), task=("lora", "adapter")[i % 2]) for i in range(12)]
        answers = await asyncio.gather(*requests)
        return answers, (await client.get("/metrics")).text

    answers, metrics = run(app, scenario)
    assert all(answer.status_code == 200 for answer in answers)
    assert [answer.json()["results"][0]["task"] for answer in answers] == [
        ("lora", "adapter")[i % 2] for i in range(12)
    ]
    batches = float(metrics.split("petl_batch_size_count ")[1].split()[0])
    assert batches < 12  # some clips of both tasks ran together


def test_a_lone_request_never_waits_for_company(runs):
    """A batch waits up to max_wait_ms only while other requests are on their way: alone, a request runs at once."""
    app = make_app(runs, max_wait_ms=5000)

    async def scenario(client):
        await post(client, wav_bytes(), task="lora")  # the first request builds what is built once
        started = time.perf_counter()
        answer = await post(client, wav_bytes(), task="all")
        return answer, time.perf_counter() - started

    answer, seconds = run(app, scenario)
    assert answer.status_code == 200 and seconds < 2.5


@pytest.mark.parametrize(
    ("data", "form", "status", "message"),
    [
        (b"", {"task": "lora"}, 400, "the upload is empty"),
        (b"not audio at all" * 10, {"task": "lora"}, 400, "the upload"),
        (wav_bytes()[:30], {"task": "lora"}, 400, "the upload"),  # cut inside the header
        (wav_bytes(), {"task": "nope"}, 404, "no task 'nope'; the tasks are lora, adapter"),
        (wav_bytes(3.0), {"task": "lora"}, 413, "the audio is over 2 s"),
        (wav_bytes(), {"task": "lora", "top_k": "0"}, 422, "top_k must be at least 1; got 0"),
        (wav_bytes(), {"task": "lora", "top_k": "many"}, 422, "top_k:"),
        (wav_bytes(), {}, 422, "task:"),
        (None, {"task": "lora"}, 422, "file:"),
    ],
)
def test_bad_requests_get_their_status_and_one_line(runs, data, form, status, message):
    app = make_app(runs, max_seconds=2.0)

    async def scenario(client):
        bad = await post(client, data, **form)
        good = await post(client, wav_bytes(), task="lora")
        return bad, good

    bad, good = run(app, scenario)
    assert bad.status_code == status, bad.text
    body = bad.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and message in body["error"]
    assert good.status_code == 200  # the server still answers


def test_upload_over_the_limit_is_413(runs):
    app = make_app(runs, max_upload_mb=0.01)
    answer = run(app, lambda client: post(client, wav_bytes(1.0), task="lora"))
    assert answer.status_code == 413 and answer.json() == {"error": "the upload is over 0.01 MB"}


def test_a_body_without_a_length_is_refused_as_it_passes_the_limit(runs):
    """A chunked upload (no Content-Length) is counted as it arrives: 413, and the server answers after."""
    app = make_app(runs, max_upload_mb=1)
    start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    sent = []

    async def body():
        for part in (start, *[b"\0" * 2**18] * 16):  # 4 MB in all
            sent.append(len(part))
            yield part

    async def scenario(client):
        headers = {"content-type": "multipart/form-data; boundary=b"}
        refused = await client.post("/v1/classify", content=body(), headers=headers)
        return refused, await post(client, wav_bytes(), task="lora")

    refused, good = run(app, scenario)
    assert refused.status_code == 413 and refused.json() == {"error": "the upload is over 1 MB"}
    assert sum(sent) < 2 * 2**20  # reading stopped at the limit: the rest was never taken in
    assert good.status_code == 200


def test_a_full_queue_is_503_never_a_hang(runs):
    app = make_app(runs, max_queue=1, max_wait_ms=300)

    async def scenario(client):
        return await asyncio.gather(*(post(client, wav_bytes(seed=i), task="all") for i in range(3)))

    statuses = [answer.status_code for answer in run(app, scenario)]
    assert set(statuses) == {503}  # two clips (task all) never fit a queue of one


def test_task_loading_only_from_the_named_folder(runs, tmp_path):
    locked = make_app({"lora": runs["lora"]})
    answer = run(locked, lambda client: client.post("/v1/tasks", json={"name": "a", "path": str(runs["adapter"])}))
    assert answer.status_code == 403 and "start the server with --task_folder DIR" in answer.json()["error"]
    folder = runs["adapter"].parent
    app = make_app({"lora": runs["lora"]}, task_folder=folder)

    async def scenario(client):
        outside = await client.post("/v1/tasks", json={"name": "x", "path": str(tmp_path)})
        added = await client.post("/v1/tasks", json={"name": "adapter", "path": runs["adapter"].name})
        scored = await post(client, wav_bytes(), task="adapter")
        removed = await client.delete("/v1/tasks/adapter")
        gone = await post(client, wav_bytes(), task="adapter")
        return outside, added, scored, removed, gone

    outside, added, scored, removed, gone = run(app, scenario)
    assert outside.status_code == 403 and "outside the task folder" in outside.json()["error"]
    assert added.status_code == 201 and added.json()["method"] == "adapter"
    assert scored.status_code == 200 and removed.json() == {"removed": "adapter"} and gone.status_code == 404
    assert json.loads(json.dumps(scored.json()))["results"][0]["task"] == "adapter"


def test_mixed_load_with_bad_inputs_answers_every_request(runs):
    """A few hundred concurrent requests mixing both tasks, `all`, and bad inputs (empty, random bytes, a cut
    header, an unknown task, a missing field, a 10-minute file, an upload over the limit): every good request is
    answered with its own task's labels, every bad one with its status, and the server answers afterwards."""
    rng = np.random.default_rng(0)
    long_file = wav_bytes(600.0)  # 10 minutes: over --max_seconds
    big_upload = b"\0" * (3 * 2**20)  # over --max_upload_mb
    bad = [
        (b"", {"task": "lora"}, 400),
        (bytes(rng.integers(0, 256, 5000, dtype=np.uint8)), {"task": "adapter"}, 400),
        (wav_bytes()[:30], {"task": "lora"}, 400),
        (wav_bytes(), {"task": "nope"}, 404),
        (wav_bytes(), {}, 422),
        (long_file, {"task": "lora"}, 413),
        (big_upload, {"task": "lora"}, 413),
    ]
    app = make_app(runs, max_batch_size=32, max_wait_ms=5, max_queue=10_000, max_upload_mb=2, max_seconds=30)
    clips = [wav_bytes(0.3 + 0.05 * (i % 5), seed=i) for i in range(5)]
    plan = []
    for i in range(300):
        if i % 10 == 9:
            plan.append(bad[(i // 10) % len(bad)])
        else:
            plan.append((clips[i % 5], {"task": ("lora", "adapter", "all")[i % 3]}, 200))

    async def scenario(client):
        semaphore = asyncio.Semaphore(32)

        async def one(data, form):
            async with semaphore:
                return await post(client, data, **form)

        answers = await asyncio.gather(*(one(data, form) for data, form, _ in plan))
        return answers, await client.get("/health")

    answers, health = run(app, scenario)
    scores = {}  # (clip, task) -> the scores of every answer: equal whatever batch the clip ran in
    for index, ((_, form, status), answer) in enumerate(zip(plan, answers)):
        assert answer.status_code == status, (form, answer.text)
        if status == 200:
            results = answer.json()["results"]
            assert [r["task"] for r in results] == (["lora", "adapter"] if form["task"] == "all" else [form["task"]])
            for result in results:
                scores.setdefault((index % 5, result["task"]), []).append([e["score"] for e in result["labels"]])
        else:
            assert list(answer.json()) == ["error"]
    for values in scores.values():
        assert all(other == pytest.approx(values[0], abs=1e-5) for other in values)
    assert health.json() == {"status": "ok", "tasks": 2}
