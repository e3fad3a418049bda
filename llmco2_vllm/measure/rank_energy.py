"""Energy of GPUs on other nodes: metered where they are, reported to the engine's accounting.

With tensor or pipeline parallelism across nodes, vLLM's engine process runs on the first node of
its replica and NVML there sees only that node's GPUs. Each vLLM worker on another node therefore
meters its own GPU (``RankEnergyReporter``, started in the worker process by the plugin) and sends
the GPU's cumulative energy once a second to the engine's accounting worker, which listens with a
``RankEnergyReceiver``. ``NodesEnergyMeter`` joins the engine's local ``EnergyMeter`` and the
received totals into one meter with the local meter's interface, so the energy windows, the
calibration and the per-GPU metrics see every GPU of the engine.

Totals are cumulative and never decrease, so a lost or late message only shifts energy into a later
window; nothing is lost. A rank that has not reported recently (or whose own meter failed) counts
as a meter incident: windows that see one are exported but not learned from.

Transport: ZeroMQ PUSH (workers) → PULL (engine), JSON messages, on ``tcp://<master_addr>:<port>``.
Sending never blocks a worker: a message the socket cannot queue is dropped (the next one carries
the newer total).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from llmco2_vllm.measure.energy_meter import EnergyMeter, GpuTotal

logger = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 1.0
# A rank whose last report is older than this is missing: a window that closes then is not learned from.
STARTUP_GRACE_SECONDS = 120.0  # a remote rank not heard from yet is only warned about after this (model loading)
STALE_AFTER_SECONDS = 5 * REPORT_INTERVAL_SECONDS
_MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class RankReport:
    """One worker's report: its GPUs' totals since its meter started, and whether they can be trusted."""

    rank: int  # the worker's global rank in the engine (tensor x pipeline)
    host: str
    gpus: tuple[GpuTotal, ...]
    incidents: int  # the worker meter's read errors, counter resets and lost GPUs so far
    available: bool
    reason: str

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "rank": self.rank,
                "host": self.host,
                "gpus": [[gpu.index, gpu.uuid, gpu.name, gpu.energy_j] for gpu in self.gpus],
                "incidents": self.incidents,
                "available": self.available,
                "reason": self.reason,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "RankReport":
        """Raises ValueError for anything that is not a well-formed report."""
        if len(data) > _MAX_MESSAGE_BYTES:
            raise ValueError(f"report of {len(data)} bytes")
        try:
            values = json.loads(data)
            gpus = tuple(
                GpuTotal(int(index), str(uuid), str(name), float(energy_j))
                for index, uuid, name, energy_j in values["gpus"]
            )
            report = cls(
                int(values["rank"]), str(values["host"]), gpus, int(values["incidents"]),
                bool(values["available"]), str(values["reason"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed report: {error!r}") from None
        if any(not math.isfinite(gpu.energy_j) or gpu.energy_j < 0 for gpu in gpus) or report.incidents < 0:
            raise ValueError("report with a negative or non-finite value")
        return report


class RankEnergyReporter:
    """In a vLLM worker on another node: meter this worker's GPUs, send their totals to the engine.

    Construction never raises and never blocks on the network (ZeroMQ connects in the background);
    ``close()`` stops the thread and releases NVML.
    """

    def __init__(
        self,
        address: str,
        rank: int,
        gpu_indices: list[int],
        pynvml_module: Any = None,
        interval_seconds: float = REPORT_INTERVAL_SECONDS,
    ) -> None:
        import zmq  # lazy: a vLLM dependency, needed only in multi-node engines

        self.address = address
        self.rank = rank
        self.meter = EnergyMeter(gpu_indices=gpu_indices, pynvml_module=pynvml_module)
        self._interval_seconds = interval_seconds
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 4)  # keep a few reports while the engine is unreachable
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._zmq = zmq
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self.sent = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="llmco2-rank-energy", daemon=True)
        self._thread.start()

    def report(self) -> RankReport:
        return RankReport(
            self.rank, self._host, self.meter.gpu_totals(), int(sum(self.meter.errors.values())),
            self.meter.available, self.meter.reason,
        )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._socket.send(self.report().to_bytes(), flags=self._zmq.NOBLOCK)
                self.sent += 1
            except self._zmq.Again:
                self.dropped += 1  # engine not reachable yet: the next report carries the newer total
            except Exception as error:  # never let metering break the worker
                logger.warning("llmco2: rank %d could not report its GPU energy: %r", self.rank, error)
            self._stop.wait(self._interval_seconds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._interval_seconds + 1)
        try:
            self._socket.send(self.report().to_bytes(), flags=self._zmq.NOBLOCK)  # the last total
        except Exception:
            pass
        self._socket.close(linger=500)
        self.meter.close()


class RankEnergyReceiver:
    """In the engine's accounting worker: the latest report of each expected remote rank."""

    def __init__(self, address: str, expected_ranks: tuple[int, ...], clock: Callable[[], float] = time.monotonic) -> None:
        import zmq

        self.address = address
        self.expected_ranks = tuple(expected_ranks)
        self.rejected = 0  # malformed reports and reports from ranks not expected
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[int, tuple[float, RankReport]] = {}
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.bind(address)  # raises zmq.ZMQError (port taken): the caller reports it
        self._zmq = zmq
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmco2-rank-energy-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv()
            except self._zmq.Again:
                continue
            except Exception:
                if self._stop.is_set():
                    return
                continue
            try:
                report = RankReport.from_bytes(data)
            except ValueError as error:
                self._reject(f"malformed energy report ignored: {error}")
                continue
            if report.rank not in self.expected_ranks:
                self._reject(f"energy report from rank {report.rank}, not one of {self.expected_ranks}; ignored")
                continue
            with self._lock:
                self._latest[report.rank] = (self._clock(), report)

    def _reject(self, message: str) -> None:
        self.rejected += 1
        if self.rejected == 1:
            logger.warning("llmco2: %s (logged once)", message)

    def reports(self) -> dict[int, tuple[float, RankReport]]:
        """Rank -> (seconds since its last report, that report)."""
        now = self._clock()
        with self._lock:
            return {rank: (now - received, report) for rank, (received, report) in self._latest.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()


class NodesEnergyMeter:
    """The engine's GPUs on every node: the local ``EnergyMeter`` plus the remote ranks' reports.

    Has the interface the energy windows use (``available``, ``gpu_totals``, ``total_energy_j``,
    ``errors``, ``close``). Each remote GPU's total never decreases here either; a rank that is
    missing, stale or whose meter failed adds an incident at each read, so windows that saw it are
    not learned from.
    """

    def __init__(
        self,
        local: EnergyMeter,
        receiver: RankEnergyReceiver,
        stale_after_seconds: float = STALE_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.receiver = receiver
        self.available = local.available
        self._stale_after_seconds = stale_after_seconds
        self._clock = clock
        self._started = clock()
        # Per (rank, uuid): the last report and the energy of earlier runs of that worker (restarts).
        self._remote: dict[tuple[int, str], tuple[GpuTotal, float]] = {}
        # Per rank: the incidents of its last report and of earlier runs of that worker.
        self._remote_incidents: dict[int, tuple[int, int]] = {}
        self._missing_reads = 0
        self._logged_missing: set[int] = set()
        self._lock = threading.Lock()

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.local.errors,
                "remote_incident": sum(last + earlier for last, earlier in self._remote_incidents.values()),
                "rank_missing": self._missing_reads,
                "rejected_report": self.receiver.rejected,
            }

    def gpu_totals(self) -> tuple[GpuTotal, ...]:
        local = self.local.gpu_totals()
        reports = self.receiver.reports()
        with self._lock:
            for rank in self.receiver.expected_ranks:
                age, report = reports.get(rank, (math.inf, None))
                if report is None or age > self._stale_after_seconds or not report.available:
                    self._missing_reads += 1
                    # Workers on other nodes start after the engine: no warning while they may still be loading.
                    starting = report is None and self._clock() - self._started < STARTUP_GRACE_SECONDS
                    if rank not in self._logged_missing and not starting:
                        self._logged_missing.add(rank)
                        why = "has not reported" if report is None else (
                            f"last reported {age:.0f} s ago" if report.available else f"cannot meter: {report.reason}"
                        )
                        logger.warning("llmco2: GPU energy of rank %d %s; its windows are not learned from", rank, why)
                if report is None:
                    continue
                last, earlier = self._remote_incidents.get(rank, (0, 0))
                if report.incidents < last:
                    earlier += last  # the worker restarted: its count starts from zero again
                self._remote_incidents[rank] = (report.incidents, earlier)
                for gpu in report.gpus:
                    key = (rank, gpu.uuid)
                    last, offset_j = self._remote.get(key, (None, 0.0))
                    if last is not None and gpu.energy_j < last.energy_j:
                        offset_j += last.energy_j  # the worker restarted: its total counts from zero again
                    self._remote[key] = (gpu, offset_j)
            remote = tuple(GpuTotal(gpu.index, gpu.uuid, gpu.name, offset_j + gpu.energy_j) for gpu, offset_j in self._remote.values())
        return local + remote

    def total_energy_j(self) -> float:
        return sum(gpu.energy_j for gpu in self.gpu_totals())

    def close(self) -> None:
        self.receiver.close()
        self.local.close()
