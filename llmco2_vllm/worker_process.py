"""The plugin's worker process: everything after capture runs outside vLLM's engine process.

Why a process and not a thread: vLLM's engine-core loop runs Python while the model runs (it
busy-polls its message queues), so any Python thread in that process takes the GIL from it, and a
thread that computes for milliseconds can hold up the next step by as much. What stays in the
engine process is the scheduler hook (``StepRecorder.record``, a few microseconds) and a forwarding
thread that wakes every ``FORWARD_INTERVAL_SECONDS``, copies each recorded step into plain lists
(``capture.compact_step``) and pickles the batch down a pipe. The worker process runs
``EnginePipeline``: step shapes, prediction, attribution, calibration against NVML, carbon, metric
snapshots and per-request results, at a lower CPU priority (``WORKER_NICENESS``) so that on a host
short of cores the engine comes first.

The worker never imports vLLM. It stops when the engine says so or when its input pipe closes
(the engine exited, however it exited), after accounting what it received. If the worker dies,
the engine logs it once and keeps serving; its steps are then no longer accounted (the
plugin-missing alert fires, since the snapshot stops changing).

Protocol: pickled messages on the worker's stdin, ``("start", PipelineSpec)`` first, then
``("steps", [CompactStep, ...], engine_dropped_total, [capture error, ...])``, ``("sync", token)``
and ``("stop",)``; on a separate pipe the worker answers a sync with ``("synced", token, report)``
once everything sent before it is accounted. The pipe connects two processes of the same server,
so pickle carries no outside input.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capture import StepRecorder, compact_step
from .hardware import Hardware
from .model_description import ModelDescription
from .settings import Settings

logger = logging.getLogger("llmco2_vllm")

FORWARD_INTERVAL_SECONDS = 0.1  # batching steps keeps the engine-side cost per step small (10 ms cost 3x more)
FORWARD_BATCH = 512  # steps per message at most, so one burst in the engine process stays short
WORKER_NICENESS = 10
START_TIMEOUT_SECONDS = 120.0  # the worker distils the GNN table at start (seconds); vLLM waits, as for a thread


@dataclass(frozen=True)
class PipelineSpec:
    """What the engine knows that the worker needs; everything else it reads from ``Settings``."""

    model_name: str
    model: ModelDescription
    hardware: Hardware
    pipeline_parallel: int
    engine: str  # data-parallel rank, the ``engine`` label
    gpu_indices: tuple[int, ...]  # CUDA ordinals of this engine's GPUs, for the energy meter
    snapshot_path: str | None  # metrics file the API server serves (None in multiprocess mode)
    results_dir: str | None  # per-request results store (None without the carbon endpoints)


def build_pipeline(spec: PipelineSpec, settings: Settings):
    """Predictor, meter, calibration, grid intensity and store for one engine; not started."""
    from .grid_intensity import build_intensity_provider
    from .pipeline import EnginePipeline
    from .predictor import load_predictor
    from .request_results import RequestResultStore

    hardware = spec.hardware
    predictor = load_predictor(settings.predictor, spec.model, hardware, spec.pipeline_parallel, in_server=True)
    meter = None
    if settings.measure_energy:
        from .energy_meter import EnergyMeter

        meter = EnergyMeter(gpu_indices=list(spec.gpu_indices))
        if not meter.available:
            logger.info("llmco2: GPU energy not measured (%s); predictions only", meter.reason)
    calibrator = None
    if settings.calibration_file:
        from .calibration import OnlineCalibrator

        calibrator = OnlineCalibrator.load(
            settings.calibration_file,
            forgetting=settings.calibration_forgetting,
            prior_idle_watts=hardware.num_gpus * hardware.gpu.idle_watts_or_default(),
        )
    intensity = build_intensity_provider(settings)
    pipeline = EnginePipeline(
        settings,
        predictor,
        hardware,
        intensity,
        spec.model_name,
        spec.engine,
        Path(spec.snapshot_path) if spec.snapshot_path else None,
        meter=meter,
        calibrator=calibrator,
        embodied=settings.embodied(),
        store=RequestResultStore.in_directory(spec.results_dir) if spec.results_dir else None,
    )
    logger.info(
        "llmco2: accounting %s on %d x %s (%s), predictor %s, grid intensity %s",
        spec.model_name,
        hardware.num_gpus,
        hardware.gpu.name,
        hardware.source,
        predictor.name,
        intensity.current().region,
    )
    return pipeline


class WorkerProcess:
    """Engine side: owns the recorder the scheduler hook fills and forwards its steps to the worker."""

    def __init__(self, spec: PipelineSpec, settings: Settings) -> None:
        self.engine = spec.engine
        self.recorder = StepRecorder(settings.queue_capacity)
        reply_read, reply_write = os.pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "llmco2_vllm.worker_process", str(reply_write)],
            stdin=subprocess.PIPE,
            pass_fds=(reply_write,),
        )
        os.close(reply_write)
        self._replies = os.fdopen(reply_read, "rb")
        self._send_lock = threading.Lock()
        self._lost = False
        self._sync_token = 0
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._send(("start", spec))
        self._await_ready()
        self._thread = threading.Thread(target=self._forward, name="llmco2-forwarder", daemon=True)
        self._thread.start()

    def _await_ready(self) -> None:
        """Start-up errors surface here, before vLLM serves: the scheduler then runs without the plugin."""
        reply = self._read_reply(START_TIMEOUT_SECONDS)
        if reply is not None and reply[0] == "ready":
            return
        self._process.kill()
        self._process.wait()
        self._process.stdin.close()
        self._replies.close()
        if reply is None:
            raise RuntimeError(
                f"the llmco2 worker process did not start within {START_TIMEOUT_SECONDS:.0f} s "
                f"(exit status {self._process.returncode}); its error, if any, is logged above"
            )
        raise RuntimeError(f"the llmco2 worker process could not start: {reply[1]}")

    def _read_reply(self, timeout: float) -> tuple | None:
        if not select.select([self._replies], [], [], max(0.0, timeout))[0]:
            return None
        try:
            return pickle.load(self._replies)
        except (EOFError, OSError, pickle.UnpicklingError):
            return None

    @property
    def alive(self) -> bool:
        return not self._lost and self._process.poll() is None

    def _send(self, message: tuple) -> bool:
        with self._send_lock:
            if self._lost:
                return False
            try:
                pickle.dump(message, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self._process.stdin.flush()
                return True
            except (OSError, ValueError) as error:  # broken pipe: the worker exited
                self._lost = True
                logger.error(
                    "llmco2: the worker process is gone (exit status %s: %r); vLLM keeps serving, steps are no "
                    "longer accounted. The worker's own error, if it had one, is logged above.",
                    self._process.poll(),
                    error,
                )
                return False

    def _forward(self) -> None:
        while not self._stop.is_set():
            if not self.forward_pending():
                self._stop.wait(FORWARD_INTERVAL_SECONDS)

    def forward_pending(self) -> int:
        """Compact and send what the scheduler hook recorded (forwarding thread; at shutdown, the caller)."""
        self._idle.clear()  # before draining: a sync must not overtake a batch in hand
        records = self.recorder.drain(FORWARD_BATCH)
        if not records:
            self._idle.set()
            return 0
        steps, errors = [], []
        for record in records:
            try:
                steps.append(compact_step(record))
            except Exception as error:  # vLLM changed a field we read: counted by the worker
                errors.append(repr(error))
        if self._lost:
            return len(records)  # nobody to send to: drop them, so memory stays bounded
        self._send(("steps", steps, self.recorder.dropped, errors))
        return len(records)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every recorded step has been accounted by the worker (tests, benchmarks)."""
        return self._sync(timeout) is not None

    def report(self, timeout: float = 30.0) -> dict | None:
        """The worker's ``EnginePipeline.report()`` once it has accounted every recorded step."""
        return self._sync(timeout)

    def _sync(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while len(self.recorder) or not self._idle.is_set():
            if time.monotonic() > deadline or not self._thread.is_alive():
                return None
            time.sleep(0.005)
        self._sync_token += 1
        token = self._sync_token
        if not self._send(("sync", token, max(0.0, deadline - time.monotonic()))):
            return None
        while True:
            reply = self._read_reply(deadline - time.monotonic())
            if reply is None:
                return None
            kind, answered, report = reply
            if kind == "synced" and answered == token:
                return report

    def stop(self, timeout: float = 10.0) -> None:
        """Forward what is left, ask the worker to finish (last window, last publish) and wait for it."""
        self._stop.set()
        self._thread.join(timeout)
        self.forward_pending()
        self._send(("stop",))
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("llmco2: the worker process did not stop within %.0f s; killing it", timeout)
            self._process.kill()
        self._replies.close()


def _serve(pipeline, messages, replies) -> None:
    """Feed the pipeline until ``stop`` or the end of input (the engine exited)."""
    while True:
        try:
            message = pickle.load(messages)
        except EOFError:
            return
        kind = message[0]
        if kind == "steps":
            _, steps, engine_dropped, errors = message
            for step in steps:
                pipeline.recorder.put(step)
            pipeline.upstream_dropped = engine_dropped
            for error in errors:
                pipeline.failed("capture", RuntimeError(error))
        elif kind == "sync":
            _, token, timeout = message
            pipeline.wait_idle(timeout)
            _reply(replies, ("synced", token, pipeline.report()))
        elif kind == "stop":
            return


def _reply(replies, message: tuple) -> None:
    pickle.dump(message, replies, protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1 or not arguments[0].isdigit():
        print("usage: python -m llmco2_vllm.worker_process REPLY_FD (started by the llmco2 vLLM plugin)", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [llmco2 worker %(process)d] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Signals meant for the server (Ctrl-C to the process group, systemd's SIGTERM to the whole
    # cgroup) must not cut the accounting short: the worker stops when the engine closes the pipe.
    for ignored in (signal.SIGINT, signal.SIGTERM):
        signal.signal(ignored, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    messages = sys.stdin.buffer
    with os.fdopen(int(arguments[0]), "wb") as replies:
        try:
            kind, spec = pickle.load(messages)
            if kind != "start":
                raise ValueError(f"expected a start message, got {kind!r}")
            pipeline = build_pipeline(spec, Settings.from_env())
        except Exception as error:
            logger.exception("llmco2: the worker process could not start; vLLM runs without the plugin")
            _reply(replies, ("failed", repr(error)))
            return 1
        pipeline.start()
        _reply(replies, ("ready", pipeline.predictor.name))
        try:
            _serve(pipeline, messages, replies)
        except Exception:
            logger.exception("llmco2: the worker process lost its input; accounting what it received")
        finally:
            pipeline.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
