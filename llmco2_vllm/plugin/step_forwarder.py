"""The engine side of the accounting: the recorder the scheduler hook fills, and the forwarding thread.

``StepForwarder`` owns the ``StepRecorder`` and a thread that wakes every
``FORWARD_INTERVAL_SECONDS``, turns each recorded step into the step contract (``StepCompactor``)
and sends the batch to the accounting worker (``llmco2_vllm.accounting.worker.serve``) — in its
own process (``LLMCO2_WORKER=process``, the default) or in a thread of this process
(``thread``). Both modes carry the same messages; only the transport differs.

If the worker dies, the forwarder logs it once and vLLM keeps serving; steps are then dropped
(bounded memory) and the plugin-missing alert fires, since the snapshot stops changing.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from llmco2_vllm.accounting.step_contract import CompactStep
from llmco2_vllm.accounting.worker import WorkerSpec, pipe_receiver, serve, write_message
from llmco2_vllm.plugin.scheduler_hook import StepCompactor, StepRecorder
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

FORWARD_INTERVAL_SECONDS = 0.1  # batched: a small engine-side cost per step (benchmarks/results/step_recording.md)
FORWARD_BATCH = 512  # steps per message at most, so one burst in the engine process stays short
START_TIMEOUT_SECONDS = 120.0  # the worker distils the GNN table at start (seconds); vLLM waits, as for a thread


class _ProcessTransport:
    """Messages to ``python -m llmco2_vllm.accounting.worker`` over its stdin, replies on a second pipe."""

    name = "process"

    def __init__(self) -> None:
        reply_read, reply_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmco2_vllm.accounting.worker", str(reply_write)],
            stdin=subprocess.PIPE,
            pass_fds=(reply_write,),
        )
        os.close(reply_write)
        self._reply_fd = reply_read
        self._receive = pipe_receiver(reply_read)

    def receive_reply(self, timeout: float) -> Any:
        try:
            return self._receive(timeout)
        except (EOFError, OSError, ValueError):  # the worker exited
            return None

    def send(self, message: tuple) -> None:
        write_message(self.process.stdin, message)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_status(self) -> Any:
        return self.process.poll()

    def close(self, timeout: float) -> None:
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("llmco2: the worker process did not stop within %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()
        os.close(self._reply_fd)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class _ThreadTransport:
    """The same worker on a daemon thread of this process, fed through a queue."""

    name = "thread"
    _END = ("end-of-input",)

    def __init__(self, settings: Settings) -> None:
        self._messages: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self.thread = threading.Thread(
            target=serve, args=(self._receive, self._replies.put, settings), name="llmco2-worker", daemon=True
        )
        self.thread.start()

    def _receive(self, timeout: float) -> Any:
        try:
            message = self._messages.get(timeout=None if timeout == float("inf") else max(0.0, timeout))
        except queue.Empty:
            return None
        if message is self._END:
            raise EOFError
        return message

    def receive_reply(self, timeout: float) -> Any:
        try:
            return self._replies.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def send(self, message: tuple) -> None:
        if not self.thread.is_alive():
            raise BrokenPipeError("the worker thread has stopped")
        self._messages.put(message)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def exit_status(self) -> Any:
        return None

    def close(self, timeout: float) -> None:
        self._messages.put(self._END)
        self.thread.join(timeout)

    def kill(self) -> None:
        self._messages.put(self._END)


class StepForwarder:
    """Engine side: owns the recorder the scheduler hook fills and forwards its steps to the worker."""

    def __init__(self, spec: WorkerSpec, settings: Settings) -> None:
        self.engine = spec.engine
        self.recorder = StepRecorder(settings.queue_capacity)
        self.mode = settings.worker
        self._transport = _ThreadTransport(settings) if settings.worker == "thread" else _ProcessTransport()
        self._send_lock = threading.Lock()
        self._lost = False
        self._sync_token = 0
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._compactor = StepCompactor()
        self._compact_lock = threading.Lock()  # the forwarding thread and a sync's release
        self._send(("start", spec.to_json()))
        self.predictor_name = self._await_ready()
        self._thread = threading.Thread(target=self._forward, name="llmco2-forwarder", daemon=True)
        self._thread.start()

    def _await_ready(self) -> str:
        """Start-up errors surface here, before vLLM serves: the scheduler then runs without the plugin."""
        reply = self._transport.receive_reply(START_TIMEOUT_SECONDS)
        if reply is not None and reply[0] == "ready":
            return reply[1]
        self._transport.kill()
        if reply is None:
            raise RuntimeError(
                f"the llmco2 worker did not start within {START_TIMEOUT_SECONDS:.0f} s "
                f"(exit status {self._transport.exit_status()}); its error, if any, is logged above"
            )
        raise RuntimeError(f"the llmco2 worker could not start: {reply[1]}")

    @property
    def alive(self) -> bool:
        return not self._lost and self._transport.alive()

    def _send(self, message: tuple) -> bool:
        with self._send_lock:
            if self._lost:
                return False
            try:
                self._transport.send(message)
                return True
            except (OSError, ValueError) as error:  # broken pipe: the worker exited
                self._lost = True
                logger.error(
                    "llmco2: the worker %s is gone (exit status %s: %r); vLLM keeps serving, steps are no "
                    "longer accounted. The worker's own error, if it had one, is logged above.",
                    self._transport.name,
                    self._transport.exit_status(),
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
        with self._compact_lock:
            for record in records:
                try:
                    steps.append(self._compactor.compact(record))
                except Exception as error:  # vLLM changed a field we read: counted by the worker
                    errors.append(repr(error))
        if not self._lost:  # else nobody to send to: drop them, so memory stays bounded
            self._send(("steps", steps, self.recorder.dropped, len(self.recorder), errors))
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
        self._release_held_finishes()
        self._sync_token += 1
        token = self._sync_token
        if not self._send(("sync", token)):
            return None
        while True:
            reply = self._transport.receive_reply(deadline - time.monotonic())
            if reply is None:
                return None
            kind, answered, report = reply
            if kind == "synced" and answered == token:
                return report

    def _release_held_finishes(self) -> None:
        """Finishes held for a step still in flight: sent now, since a caller wants the totals (offline
        ``LLM`` with async scheduling leaves the last step in vLLM's batch queue). If that step is
        updated later, its positions for the request count as a second, short request."""
        with self._compact_lock:
            released = self._compactor.release()
        if released and not self._lost:
            no_work = CompactStep([], [], [], None, {}, {}, released, time.perf_counter(), 0.0)
            self._send(("steps", [no_work], self.recorder.dropped, len(self.recorder), []))

    def stop(self, timeout: float = 10.0) -> None:
        """Forward what is left, ask the worker to finish (last window, last publish) and wait for it."""
        self._stop.set()
        self._thread.join(timeout)
        self.forward_pending()
        self._release_held_finishes()
        self._send(("stop",))
        self._transport.close(timeout)


__all__ = ["StepForwarder", "FORWARD_INTERVAL_SECONDS"]
