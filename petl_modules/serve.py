"""Serve many tasks on one backbone over HTTP, with dynamic batching (FastAPI + uvicorn: `pip install -e .[serve]`).

    python -m petl_modules.serve --task NAME=DIR [--task NAME=DIR ...] [--host 127.0.0.1] [--port 8000]
        [--device cpu|cuda] [--max_batch_size 16] [--max_wait_ms 10] [--max_queue 256] [--max_upload_mb 20]
        [--max_seconds 60] [--task_folder DIR]

API (JSON; errors are `{"error": "one line"}`):

- `GET /`: a page to try the tasks (pick a task, upload or record a clip, see the top labels as bars); it loads
  nothing from elsewhere (`serve_page.html`, the only assets inline), so it works offline.
- `GET /health` -> `{"status": "ok", "tasks": N}`
- `GET /v1/tasks` -> `[{name, method, backbone, classes, trainable_params}, ...]`
- `POST /v1/classify`, multipart form `file` (any audio `classify` reads), `task` (a name, or `all`), `top_k`
  (default 5) -> `{"results": [{"task", "labels": [{"label", "score"}, ...]}]}`, labels best first, the scores
  the class probabilities `classify --json` gives. 400 unreadable or empty audio, 404 unknown task, 413 upload
  or duration over the limits, 422 missing fields or bad `top_k`, 503 when the queue is full.
- `GET /metrics`: Prometheus text (requests by status, batch sizes, queue and inference time).
- With `--task_folder DIR` only (export folders hold HyperPyYAML, which runs code): `POST /v1/tasks`
  `{"name", "path"}` (a folder inside DIR) and `DELETE /v1/tasks/{name}`.

Dynamic batching: a batch of up to `max_batch_size` clips (one per request and task, any mix of tasks) waits at most
`max_wait_ms` for more clips, and only while other requests are on their way (a lone request runs at once); it
runs as one mixed batch of the multi-task classifier (`petl_modules.multitask`). Decoding, resampling and the
front end (AST's fbank) run in worker threads, the model in one thread of its own, so neither blocks the server.
Request bodies over `max_upload_mb` are refused without being stored (`UploadLimit`). The server keeps no state
between requests besides the loaded tasks: replicas behind a load balancer scale it out.
It binds to the loopback interface by default; serve only exports you trust.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

try:  # the `serve` extra
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.exceptions import HTTPException
except ImportError:  # `create_app` and `main` say how to install it
    FastAPI = None

from .backbones import BackboneLoadError
from .data import AudioError, AudioTooLongError, decode_audio
from .hparams_loader import HparamsError
from .multitask import MultiTaskClassifier
from .run_folder import InferenceError


@dataclass
class ServeSettings:
    """The server's limits and options (the command line's)."""

    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256  # clips waiting for the model; more: 503
    max_upload_mb: float = 20.0
    max_seconds: float = 60.0
    task_folder: Path | None = None  # loading tasks at run time: only from inside this folder


class ServeError(Exception):
    """A request the server answers with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Pending:
    inputs: torch.Tensor  # the clip as its task's backbone reads it (`MultiTaskClassifier.clip_input`)
    task: str
    group: str  # its task's input group: one batch per group
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects clips from concurrent requests into mixed batches of the classifier (one model thread)."""

    def __init__(self, classifier: MultiTaskClassifier, settings: ServeSettings, metrics) -> None:
        self.classifier = classifier
        self.settings = settings
        self.metrics = metrics
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="petl-model")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self.waiting = 0
        self._arriving = 0

    def _start(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return self._queue

    def inputs(self, wav: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """What the model reads of `wav` for each of `tasks` (front-end features computed once per input group);
        run in a worker thread, so that the front end of one request overlaps the model's batch of others.
        """
        by_group: dict[str, torch.Tensor] = {}
        for task in tasks:
            group = self.classifier.input_group(task)
            if group not in by_group:
                by_group[group] = self.classifier.clip_input(wav, task)
        return [by_group[self.classifier.input_group(task)] for task in tasks]

    @contextmanager
    def arriving(self):
        """Counts a request from its arrival to its clips' entry in the queue (`submit`): a batch being formed
        waits for more clips (up to `max_wait_ms`) only while some request is on its way, never for nobody.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def submit(self, inputs: Sequence[torch.Tensor], tasks: Sequence[str]) -> list[asyncio.Future]:
        """Queue one clip for each of `tasks` (`inputs`: from `inputs`); each future gets its class probabilities."""
        queue = self._start()
        if self.waiting + len(tasks) > self.settings.max_queue:
            raise ServeError(503, f"the queue is full ({self.waiting} clips waiting); retry later")
        loop = asyncio.get_running_loop()
        groups = [self.classifier.input_group(task) for task in tasks]
        pending = [_Pending(x, task, group, loop.create_future()) for x, task, group in zip(inputs, tasks, groups)]
        self.waiting += len(pending)
        for item in pending:
            queue.put_nowait(item)
        return [item.future for item in pending]

    async def run_in_model_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, function, *args)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._arriving:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            self.waiting -= len(batch)
            started = time.perf_counter()
            for item in batch:
                self.metrics["queue"].observe(started - item.enqueued)
            self.metrics["batch"].observe(len(batch))
            try:
                results = await self.run_in_model_thread(self._score, batch)
            except Exception as error:  # noqa: BLE001 - every waiting request learns of the failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.metrics["inference"].observe(time.perf_counter() - started)
            for item, probabilities in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(probabilities)

    def _score(self, batch: list[_Pending]) -> list[torch.Tensor]:
        """Each clip's class probabilities: one `class_probabilities` call per input group in the batch."""
        results: list[torch.Tensor | None] = [None] * len(batch)
        for group in dict.fromkeys(item.group for item in batch):
            rows = [row for row, item in enumerate(batch) if item.group == group]
            clips = [batch[row].inputs for row in rows]
            if clips[0].dim() == 2:  # features of one shape
                inputs, lens = torch.stack(clips), None
            else:  # waveforms: zero-padded, with SpeechBrain relative lengths
                longest = max(len(clip) for clip in clips)
                inputs = torch.stack([F.pad(clip, (0, longest - len(clip))) for clip in clips])
                lens = torch.tensor([len(clip) / longest for clip in clips])
            scored = self.classifier.class_probabilities(inputs, lens, [batch[row].task for row in rows])
            for row, probabilities in zip(rows, scored):
                results[row] = probabilities
        return results


def _decode(data: bytes, sample_rate: int, max_seconds: float) -> torch.Tensor:
    """The upload's audio as a mono waveform at `sample_rate` (the checks and messages of `read_audio`)."""
    try:
        return decode_audio(data, sample_rate, "the upload", max_seconds)
    except AudioTooLongError as error:
        raise ServeError(413, str(error)) from None
    except AudioError as error:
        raise ServeError(400, str(error)) from None


FORM_OVERHEAD = 64 * 2**10  # what a multipart body may hold besides the file: boundaries, headers, fields
DRAIN_LIMIT = 2**30  # a declared body over the upload limit but under this is read and dropped before the 413


def upload_over_limit(max_upload_mb: float) -> str:
    """The 413 message of an upload over `--max_upload_mb` (the body's, or the file's within it)."""
    return f"the upload is over {max_upload_mb:g} MB"


class UploadLimit:
    """ASGI middleware: a request body over `max_upload_mb` plus `FORM_OVERHEAD` ends in 413, and no upload is
    ever stored whole.

    A declared `Content-Length` over the limit is answered without storing any of the body: at once to a client
    that waits for `100 Continue` (curl, for large uploads), which then sends none of it; after reading and
    dropping the body, up to `DRAIN_LIMIT`, from a client that sends it all before reading the answer (most
    HTTP libraries: closing the connection first would lose them the answer). A body without a length is
    counted as it arrives and refused when it passes the limit.
    """

    def __init__(self, app, max_upload_mb: float) -> None:
        self.app = app
        self.limit = int(max_upload_mb * 2**20) + FORM_OVERHEAD
        self.message = upload_over_limit(max_upload_mb)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= DRAIN_LIMIT:
                while (await receive()).get("more_body", False):
                    pass
            response = JSONResponse({"error": self.message}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.message)
            return message

        return await self.app(scope, counted, send)


def _prepare(batcher: Batcher, data: bytes, max_seconds: float, tasks: Sequence[str]) -> list[torch.Tensor]:
    """An upload's model inputs for `tasks` (decoding, resampling and the front end: a worker thread's work)."""
    return batcher.inputs(_decode(data, batcher.classifier.sample_rate(), max_seconds), tasks)


def create_app(classifier: MultiTaskClassifier, settings: ServeSettings | None = None):
    """The ASGI app serving `classifier`'s tasks."""
    if FastAPI is None:
        raise ImportError("the server needs its extra: pip install -e .[serve]")
    settings = settings or ServeSettings()
    registry = CollectorRegistry()
    requests = Counter("petl_requests", "HTTP requests by path and status", ["path", "status"], registry=registry)
    metrics = {
        "batch": Histogram(
            "petl_batch_size", "clips per model batch", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64)
        ),
        "queue": Histogram("petl_queue_seconds", "time a clip waited for its batch", registry=registry),
        "inference": Histogram("petl_inference_seconds", "time of one model batch", registry=registry),
    }
    batcher = Batcher(classifier, settings, metrics)
    app = FastAPI(title="PETL audio tasks", docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)

    app.add_middleware(UploadLimit, max_upload_mb=settings.max_upload_mb)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        requests.labels(request.url.path if request.url.path in KNOWN_PATHS else "other", response.status_code).inc()
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    page = (Path(__file__).parent / "serve_page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health():
        return {"status": "ok", "tasks": len(classifier.tasks)}

    @app.get("/v1/tasks")
    async def tasks():
        return [
            {
                "name": task.name,
                "method": task.method,
                "backbone": classifier.backbone_kind,
                "classes": task.classes,
                "trainable_params": task.trainable_parameters,
            }
            for task in classifier.tasks.values()
        ]

    @app.post("/v1/classify")
    async def classify(
        file: Annotated[UploadFile, File()], task: Annotated[str, Form()], top_k: Annotated[int, Form()] = 5
    ):
        if top_k < 1:
            raise ServeError(422, f"top_k must be at least 1; got {top_k}")
        names = list(classifier.tasks) if task == "all" else [task]
        unknown = [name for name in names if name not in classifier.tasks]
        if unknown or not names:
            raise ServeError(404, f"no task {task!r}; the tasks are {', '.join(classifier.tasks) or 'none'}")
        with batcher.arriving():
            limit = int(settings.max_upload_mb * 2**20)
            data = await file.read(limit + 1)
            if len(data) > limit:
                raise ServeError(413, upload_over_limit(settings.max_upload_mb))
            if not data:
                raise ServeError(400, "the upload is empty")
            inputs = await asyncio.to_thread(_prepare, batcher, data, settings.max_seconds, names)
            pending = batcher.submit(inputs, names)
        probabilities = await asyncio.gather(*pending)
        results = []
        for name, row in zip(names, probabilities):
            classes = classifier.tasks[name].classes
            values, order = row.topk(min(top_k, len(classes)))
            labels = [{"label": classes[i], "score": float(v)} for v, i in zip(values.tolist(), order.tolist())]
            results.append({"task": name, "labels": labels})
        return {"results": results}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/tasks")
    async def add(request: Request):
        folder = _loading_folder(settings)
        body = await request.json() if request.headers.get("content-type", "").startswith("application/json") else {}
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ServeError(422, 'give a JSON body {"name": NAME, "path": FOLDER}')
        target = (folder / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        if not target.is_relative_to(folder):
            raise ServeError(403, f"path {path!r} is outside the task folder {folder}")
        try:
            task = await batcher.run_in_model_thread(classifier.add_task, name, target)
        except (InferenceError, HparamsError, BackboneLoadError) as exc:
            raise ServeError(400, str(exc)) from None
        return JSONResponse({"name": task.name, "method": task.method, "classes": task.classes}, status_code=201)

    @app.delete("/v1/tasks/{name}")
    async def remove(name: str):
        _loading_folder(settings)
        if name not in classifier.tasks:
            raise ServeError(404, f"no task {name!r}")
        await batcher.run_in_model_thread(classifier.remove_task, name)
        return {"removed": name}

    return app


KNOWN_PATHS = ("/", "/health", "/v1/tasks", "/v1/classify", "/metrics")


# The page may run its inline script and style and talk to this server only (recordings are decoded in blobs).
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "media-src 'self' blob:; img-src data:; base-uri 'none'; form-action 'none'"
)


def _loading_folder(settings: ServeSettings) -> Path:
    if settings.task_folder is None:
        raise ServeError(403, "loading tasks at run time is off; start the server with --task_folder DIR")
    return Path(settings.task_folder).resolve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m petl_modules.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", required=True, metavar="NAME=DIR", help="a task (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    defaults = ServeSettings()
    parser.add_argument("--max_batch_size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--max_queue", type=int, default=defaults.max_queue)
    parser.add_argument("--max_upload_mb", type=float, default=defaults.max_upload_mb)
    parser.add_argument("--max_seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--task_folder", help="allow POST/DELETE /v1/tasks, for folders inside this one only")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = ServeSettings(
        args.max_batch_size,
        args.max_wait_ms,
        args.max_queue,
        args.max_upload_mb,
        args.max_seconds,
        Path(args.task_folder) if args.task_folder else None,
    )
    for option in ("max_batch_size", "max_queue"):
        if getattr(settings, option) < 1:
            sys.exit(f"serve: error: --{option} must be at least 1")
    try:
        import uvicorn
    except ImportError:
        uvicorn = None
    if uvicorn is None or FastAPI is None:
        sys.exit("serve: error: the server needs its extra: pip install -e .[serve]")
    classifier = MultiTaskClassifier(device)
    try:
        for spec in args.task:
            name, sep, folder = spec.partition("=")
            if not sep or not name or not folder:
                raise InferenceError(f"--task {spec}: expected NAME=DIR (a run or export folder)")
            classifier.add_task(name, folder)
    except (InferenceError, HparamsError, BackboneLoadError, AudioError) as error:
        sys.exit(f"serve: error: {error}")
    print(f"serving {len(classifier.tasks)} task(s) on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(classifier, settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()


__all__ = ["Batcher", "ServeError", "ServeSettings", "create_app", "main"]
