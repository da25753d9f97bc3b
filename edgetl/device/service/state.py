"""The service's state: the learner's thread, the training job, the limits.

One thread owns the :class:`~edgetl.device.Learner` (its backbone and its store connection);
every request that needs it runs there, one at a time, so the backbone stays loaded and SQLite
sees one writer. A training job runs in a thread of its own on its own store connection
(training never runs the backbone), so predictions and uploads go on while it trains; the
store's generation guard keeps a training from undoing a delete or a rollback that was
acknowledged while it ran.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from ...errors import ConfigError, EdgetlError
from ...head.fit import HeadTrainConfig

log = logging.getLogger("edgetl")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
HOLDOUT_EVERY = 4  # each training first measures a head without every 4th stored photo of each class


@dataclass(frozen=True)
class Limits:
    """What one request may carry. Photos are also bounded in pixels by the decoder
    (``EDGETL_MAX_PIXELS``, 40 MP by default), and all of a request's together by
    ``max_request_pixels``."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 64
    max_label_chars: int = 100
    # Decode budget of one request, in pixels after JPEG's reduced decoding (a 12 MP phone JPEG
    # costs 0.19 MP at 224 px; a 40 MP PNG all of its 40 MP, ~0.3 s): 64 phone photos fit many
    # times over, 64 huge PNGs of 5 KB each cannot hold the learner for 17 s.
    max_request_pixels: int = 100_000_000


class Abandoned(EdgetlError):
    """A training job given up (the service is stopping); nothing was saved."""


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Job:
    id: str
    state: str = "queued"  # queued -> running -> done | failed
    progress: float = 0.0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None
    error: str | None = None

    def doc(self) -> dict:
        d = {"id": self.id, "state": self.state, "progress": round(self.progress, 3), "created": self.created,
             "started": self.started, "finished": self.finished}
        if self.result is not None:
            d["result"] = self.result
        if self.error is not None:
            d["error"] = self.error
        return d


def _job_result(r: dict) -> dict:
    """What a finished training reports: the new version and its accuracy figures."""
    keep = ("version", "labels", "new_classes", "dropped_classes", "num_samples", "stored", "replay",
            "train_accuracy", "final_loss", "seconds", "heldout", "new_class_bias", "activated", "candidate")
    return {k: r[k] for k in keep if k in r}


class Service:
    """The state behind the app: the learner's thread, the training job, the limits and token."""

    def __init__(self, open_learner, token: str | None = None, limits: Limits | None = None,
                 train_config: HeadTrainConfig | None = None, holdout_every: int | None = HOLDOUT_EVERY,
                 grace_s: float = 5.0):
        self._open_learner = open_learner
        self.token = token
        self.limits = limits or Limits()
        self.train_config = train_config
        self.holdout_every = holdout_every
        self.grace_s = grace_s
        self.learner = None
        self.phone_dir = None  # the phone app built for the learner's bundle (see app.create_app)
        self.phone_error = "not built yet"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-learner")
        self.jobs: dict[str, Job] = {}
        self._job_lock = threading.Lock()
        self._job_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.learner = await self.call(self._open_learner)

    async def stop(self) -> None:
        """Let a running training finish for ``grace_s``, then abandon it (nothing is saved)."""
        t = self._job_thread
        if t is not None and t.is_alive():
            log.info("waiting up to %.0f s for the training job to finish", self.grace_s)
            await asyncio.get_running_loop().run_in_executor(None, t.join, self.grace_s)
            if t.is_alive():
                log.warning("abandoning the training job: the service is stopping; nothing is saved")
                self._stopping.set()
                await asyncio.get_running_loop().run_in_executor(None, t.join)
        if self.learner is not None:
            await self.call(self.learner.close)
            self.learner = None
        self._pool.shutdown(wait=True)

    async def call(self, fn, *args, **kwargs):
        """Run ``fn`` on the learner's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    # -- training -------------------------------------------------------------------------------
    def start_training(self) -> Job:
        with self._job_lock:
            running = next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)
            if running is not None:
                raise HTTPProblem(409, f"a training is already {running.state} (job {running.id}); "
                                       "wait for it: GET /api/jobs/" + running.id)
            if self._stopping.is_set():
                raise HTTPProblem(503, "the service is stopping")
            job = Job(id=uuid.uuid4().hex[:12])
            self.jobs[job.id] = job
            for old in sorted(self.jobs.values(), key=lambda j: j.created)[:-20]:  # keep the last 20
                del self.jobs[old.id]
            self._job_thread = threading.Thread(target=self._train, args=(job,), name="edgetl-train", daemon=True)
            self._job_thread.start()
            return job

    def _train(self, job: Job) -> None:
        job.state, job.started = "running", time.time()

        def progress(fraction: float) -> None:
            if self._stopping.is_set():
                raise Abandoned("abandoned: the service stopped during the training; nothing was saved, "
                                "train again")
            job.progress = max(job.progress, min(1.0, float(fraction)))

        worker = None
        try:
            worker = self.learner.worker()
            r = worker.train(self.train_config, progress=progress, holdout_every=self.holdout_every)
            job.result, job.state, job.progress = _job_result(r), "done", 1.0
        except EdgetlError as exc:
            job.error, job.state = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - a job never takes the service down
            log.exception("training job %s failed", job.id)
            job.error, job.state = f"internal error ({type(exc).__name__}); see the service's log", "failed"
        finally:
            if worker is not None:
                worker.close()
            job.finished = time.time()


def new_token() -> str:
    return secrets.token_urlsafe(16)


def check_binding(host: str, token: str | None) -> None:
    """Any address but this machine's own needs a token."""
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(f"serving on {host} makes the device reachable from the network: it needs a token "
                          "(--token, or leave it out to have one generated)")
