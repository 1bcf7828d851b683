"""`ifmvse serve`: a trained, ensembled run behind HTTP, loaded and compiled once.

Starlette on uvicorn. At start-up a thread loads the run into a `Predictor` (backbones, heads,
ensemble weights) and compiles every bucket program; `GET /health` answers 503 until then.
`POST /predict` takes one audio file as the raw body or one or more files as multipart form
data, checks it (size, content type, header, truncation, duration) and queues it. One batcher
task gathers the queued requests for a short window (or until `max_clips` files) and runs them
as one call of the predictor on a single worker thread, so concurrent clients share batches of
the same bucketed, jit-compiled path as `ifmvse extract` and `ifmvse predict`. The queue is
bounded (503 with Retry-After when full) and every request has a timeout (504).

`POST /segments` takes one long recording as the raw body (streamed to disk, up to
`max_timeline_bytes` and `max_timeline_s`) and answers JSON Lines as the segments are scored
(`jax_ifmvse.timeline`): one row per segment, then one `{"summary": ...}` line. Its batches of
segments go through the same queue and worker as /predict requests (503 when full; each batch
must be queued and scored within `timeout_s`); a refusal before the first row is the same JSON
error as /predict's, a failure after it is a last `{"error": ..., "status": ...}` line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import functools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax_ifmvse.predictor import RunPredictor

from jax_ifmvse import __version__
from jax_ifmvse.compile_cache import compile_cache_dir
from jax_ifmvse.data.audio import audio_formats, probe_audio

RAW_TYPES = ("application/octet-stream",)  # besides audio/*
EXTENSIONS = {  # content type -> file suffix the decoder accepts
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/opus": ".opus",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
}
MAGIC = (
    (b"RIFF", ".wav"),
    (b"RIFX", ".wav"),
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_files: int = 16  # per multipart request
    max_audio_s: float = 300.0  # per file; the run's config crops or chunks what it keeps
    timeout_s: float = 30.0  # queued + computed, per request
    max_queue: int = 64  # requests waiting for the worker; more get 503
    window_ms: float = 5.0  # how long the batcher waits for more requests to join a batch
    max_clips: int = 8  # files per batch the batcher aims for (more buys nothing on a CPU)
    max_timeline_bytes: int = 512 * 1024 * 1024  # /segments body (streamed to disk)
    max_timeline_s: float = 3600.0  # /segments: longest recording
    segment_batch: int = 16  # /segments: segments scored per queued job


class BadRequest(Exception):
    """A request the server refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclasses.dataclass
class _Job:
    paths: list[Path]
    future: asyncio.Future
    abandoned: bool = False  # timed out before the worker took it
    call: Any = None  # a /segments batch: run alone, its result is the job's


class Service:
    """The server's state: the predictor (once warm), the bounded queue and the batcher."""

    def __init__(self, run: str | Path, limits: Limits, predictor: RunPredictor | None = None):
        self.run = Path(run)
        self.limits = limits
        self.predictor = predictor
        self.error: str | None = None
        self.queue: asyncio.Queue[_Job] | None = None
        self.worker = cf.ThreadPoolExecutor(1, thread_name_prefix="ifmvse-predict")
        self.batches = 0
        self.clips = 0
        self.segments = 0
        self._held: _Job | None = None  # a /segments job met while gathering files
        self._tasks: list[asyncio.Task] = []

    @property
    def ready(self) -> bool:
        """Whether the run is loaded and every program compiled."""
        return self.predictor is not None and self.predictor.ready

    def load(self) -> None:
        """Load the run and compile its programs (on a thread: /health answers meanwhile)."""
        # lazy: JAX and the backbones import here, on the loading thread, not before binding
        from jax_ifmvse.predict import open_predictor

        try:
            p = self.predictor or open_predictor(self.run, max_clips=self.limits.max_clips)
            p.warm_up()
            self.predictor = p
            print(f"ifmvse serve: {self.run} ready (warm-up {p.warmup_s:.1f} s)", flush=True)
            info = p.info()
            print(f"ifmvse serve: trained on corpus {info.get('corpus_summary')}", flush=True)
            if info.get("corpus_note"):
                print(f"ifmvse serve: {info['corpus_note']}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported by /health and on stderr
            self.error = " ".join(str(e).split()) or type(e).__name__
            print(f"ifmvse serve: {self.run}: warm-up failed: {self.error}", flush=True)

    async def start(self) -> None:
        """Start warm-up and the batcher in the running event loop."""
        self.queue = asyncio.Queue(maxsize=self.limits.max_queue)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self.load, name="ifmvse-warmup", daemon=True).start()
        self._tasks.append(loop.create_task(self._batcher()))

    async def stop(self) -> None:
        """Cancel the batcher; the worker thread finishes its batch."""
        for t in self._tasks:
            t.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, paths: list[Path], call: Any = None) -> Any:
        """Queue files for the next batch (or `call`, a /segments batch run alone) and wait for
        their results (503 full, 504 late)."""
        assert self.queue is not None
        job = _Job(paths, asyncio.get_running_loop().create_future(), call=call)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise BadRequest(
                503, f"busy: {self.limits.max_queue} requests queued", {"Retry-After": "1"}
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.timeout_s)
        except TimeoutError:
            job.abandoned = True
            raise BadRequest(504, f"timed out after {self.limits.timeout_s:g} s") from None

    async def _batcher(self) -> None:
        """Gather queued jobs for `window_ms` (up to `max_clips` files), run them as one call."""
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first, self._held = self._held or await self.queue.get(), None
            if first.call is not None:
                await self._run_alone(first)
                continue
            jobs = [first]
            n = len(jobs[0].paths)
            deadline = loop.time() + self.limits.window_ms / 1000
            while n < self.limits.max_clips:
                try:
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                if job.call is not None:  # a /segments batch: next, on its own
                    self._held = job
                    break
                jobs.append(job)
                n += len(job.paths)
            jobs = [j for j in jobs if not j.abandoned]
            if not jobs:
                continue
            paths = [p for j in jobs for p in j.paths]
            try:
                scored = await loop.run_in_executor(
                    self.worker, self.predictor.predict_files, paths
                )
            except Exception as e:  # noqa: BLE001 - the requests get a 500, the server goes on
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches += 1
            self.clips += len(paths)
            at = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(scored[at : at + len(j.paths)])
                at += len(j.paths)

    async def _run_alone(self, job: _Job) -> None:
        """Run one /segments batch on the worker thread, unless its request gave up."""
        if job.abandoned:
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.worker, job.call)
        except Exception as e:  # noqa: BLE001 - the stream reports it, the server goes on
            if not job.future.done():
                job.future.set_exception(e)
            return
        self.segments += len(result)
        if not job.future.done():
            job.future.set_result(result)

    def info(self) -> dict:
        """`GET /info`: the run, its backbones and sources, score sets, weights and limits."""
        cache = compile_cache_dir()
        return {
            **self.predictor.info(),
            "limits": dataclasses.asdict(self.limits),
            "compile_cache": None if cache is None else str(cache),
            "served": {"batches": self.batches, "clips": self.clips, "segments": self.segments},
            "version": __version__,
        }


def _suffix(content_type: str, filename: str | None, head: bytes) -> str:
    """A file suffix the decoder accepts: the upload's own, its content type's, or its magic."""
    if filename and Path(filename).suffix.lower().lstrip(".") in audio_formats():
        return Path(filename).suffix.lower()
    if content_type in EXTENSIONS:
        return EXTENSIONS[content_type]
    for magic, ext in MAGIC:
        if head.startswith(magic):
            return ext
    return ".wav"  # the decoder then names what is wrong with it


def check_audio(path: Path, name: str, limits: Limits) -> float:
    """Duration of an uploaded file from its header, or BadRequest naming the file and reason.

    The header checks are `data.audio.probe_audio`'s, the ones `ifmvse predict` makes, so both
    refuse the same files with the same reason (`predict` in its `error` column).
    """
    pr = probe_audio(path)
    if pr.problem is not None:
        raise BadRequest(422, f"{name}: {pr.problem}")
    seconds = float(pr.duration_s)
    if seconds > limits.max_audio_s:
        raise BadRequest(
            422, f"{name}: {seconds:.1f} s of audio is over the limit of {limits.max_audio_s:g} s"
        )
    return seconds


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"upload of {int(declared)} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _save_body(request, path: Path, limit: int) -> int:
    """Stream the request body to `path` (never held in memory), 413 past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"upload of {int(declared)} bytes is over the limit of {limit}")
    size = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"upload is over the limit of {limit} bytes")
            f.write(chunk)
    return size


def _segmentation(query: Any, predictor: Any) -> Any:
    """The /segments query (mode, window_s, hop_s, vad_level) as checked settings (422)."""
    from jax_ifmvse.timeline import Segmentation, TimelineError

    def number(key: str, kind: type) -> Any:
        value = query.get(key)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError:
            raise BadRequest(422, f"{key}={value!r}: not a number") from None

    level = number("vad_level", int)
    seg = Segmentation(
        query.get("mode", "fixed"), number("window_s", float), number("hop_s", float),
        2 if level is None else level,
    )  # fmt: skip
    try:
        return seg.resolved(predictor)
    except TimelineError as e:
        raise BadRequest(422, str(e)) from None


async def _uploads(request, limits: Limits) -> list[tuple[str, str, bytes]]:
    """(name, content type, bytes) of each uploaded file, from a raw body or multipart form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        from starlette.formparsers import MultiPartException, MultiPartParser

        body = await _read_body(request, limits.max_upload_bytes)

        async def stream():
            yield body

        parser = MultiPartParser(
            request.headers,
            stream(),
            max_files=limits.max_files,
            max_fields=limits.max_files,
            max_part_size=limits.max_upload_bytes,
        )
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise BadRequest(400, f"bad multipart body ({e.message})") from None
        files = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                raise BadRequest(400, f"form field {key!r} is not a file upload")
            data = await value.read()
            files.append((value.filename or key, (value.content_type or "").lower(), data))
        if not files:
            raise BadRequest(400, "multipart body holds no file")
        return files
    if ctype.startswith("audio/") or ctype in RAW_TYPES:
        body = await _read_body(request, limits.max_upload_bytes)
        name = request.query_params.get("name") or "body"
        return [(name, ctype, body)]
    raise BadRequest(
        415,
        f"content type {ctype or '(none)'!r} is not audio; send audio/*, "
        "application/octet-stream or multipart/form-data",
    )


def create_app(
    run: str | Path, limits: Limits | None = None, predictor: RunPredictor | None = None
):
    """The Starlette application serving `run` (a `predictor` already built may be passed)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    svc = Service(run, limits or Limits(), predictor)

    def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": reason, "status": status}, status, headers=headers)

    def not_ready() -> JSONResponse:
        if svc.error:
            return error(503, f"warm-up failed: {svc.error}")
        return error(503, "warming up: compiling the run's programs", {"Retry-After": "5"})

    async def health(request: Request) -> JSONResponse:
        if not svc.ready:
            return not_ready()
        return JSONResponse({"status": "ready", "warmup_s": svc.predictor.warmup_s})

    async def info(request: Request) -> JSONResponse:
        if not svc.ready:
            return not_ready()
        return JSONResponse(svc.info())

    async def predict(request: Request) -> JSONResponse:
        if not svc.ready:
            return not_ready()
        tmp = Path(tempfile.mkdtemp(prefix="ifmvse-serve-"))
        t0 = time.perf_counter()
        try:
            files = await _uploads(request, svc.limits)
            paths, names = [], []
            for k, (name, ctype, data) in enumerate(files):
                if not data:
                    raise BadRequest(400, f"{name}: empty file (0 bytes)")  # as predict says
                path = tmp / f"{k:03d}{_suffix(ctype, name, data[:4])}"
                path.write_bytes(data)
                check_audio(path, name, svc.limits)
                paths.append(path)
                names.append(name)
            scored = await svc.submit(paths)
            results = []
            for name, s in zip(names, scored, strict=True):
                p = s.prediction
                if p.failed:  # nothing of the file could be heard: a bad upload
                    raise BadRequest(422, f"{name}: {p.error}")
                results.append(p.as_dict(name))
            ms = (time.perf_counter() - t0) * 1000
            answer = {"results": results, "elapsed_ms": round(ms, 2)}
            note = getattr(
                svc.predictor, "corpus_note", None
            )  # a run that knows only synthetic speech says so
            if note:
                answer["note"] = note
            return JSONResponse(answer)
        except BadRequest as e:
            return error(e.status, e.reason, e.headers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def segments(request: Request):
        if not svc.ready:
            return not_ready()
        from starlette.responses import StreamingResponse

        from jax_ifmvse.timeline import Decode, cut_segments, plan_file, score_batch, summarize

        lim = svc.limits
        tmp = Path(tempfile.mkdtemp(prefix="ifmvse-segments-"))
        loop = asyncio.get_running_loop()
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (ctype.startswith("audio/") or ctype in RAW_TYPES):
                raise BadRequest(415, f"content type {ctype or '(none)'!r}: /segments takes one"
                                 " recording as the raw body (audio/*, application/octet-stream)")  # fmt: skip
            name = request.query_params.get("name") or "body"
            seg = _segmentation(request.query_params, svc.predictor)
            raw = tmp / "upload"
            if await _save_body(request, raw, lim.max_timeline_bytes) == 0:
                raise BadRequest(400, f"{name}: empty file (0 bytes)")
            with open(raw, "rb") as f:
                head = f.read(4)
            path = raw.rename(tmp / f"upload{_suffix(ctype, name, head)}")
            plan = await loop.run_in_executor(None, plan_file, path, seg, lim.max_timeline_s)
            if plan.problem is not None:
                raise BadRequest(422, f"{name}: {plan.problem}")
        except BadRequest as e:
            shutil.rmtree(tmp, ignore_errors=True)
            return error(e.status, e.reason, e.headers)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        async def lines():
            decode, rows = Decode(), []
            batches = cut_segments(plan, lim.segment_batch, decode)
            try:
                while (cuts := await loop.run_in_executor(None, next, batches, None)) is not None:
                    call = functools.partial(score_batch, svc.predictor, plan, cuts, name)
                    try:
                        got = await svc.submit([], call)
                    except BadRequest as e:
                        yield json.dumps({"error": e.reason, "status": e.status}) + "\n"
                        return
                    except Exception as e:  # noqa: BLE001 - the stream ends with the reason
                        why = f"internal error: {type(e).__name__}: {e}"
                        yield json.dumps({"error": why, "status": 500}) + "\n"
                        return
                    rows.extend(got)
                    yield "".join(json.dumps(r.as_dict(name)) + "\n" for r in got)
                summary = summarize(plan, rows, decode, name)
                note = getattr(svc.predictor, "corpus_note", None)
                if note:
                    summary["note"] = note
                yield json.dumps({"summary": summary}) + "\n"
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @asynccontextmanager
    async def lifespan(app):
        await svc.start()
        yield
        await svc.stop()

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/segments", segments, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.service = svc
    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None):
    """Check the run, then serve it with uvicorn until interrupted (warm-up runs meanwhile)."""
    import uvicorn

    from jax_ifmvse.inference import run_manifest  # lazy: this module imports no JAX

    run_manifest(Path(run))  # a run that cannot serve fails here, in one line, before binding
    app = create_app(run, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
