"""The accounting worker: everything after the scheduler hook runs here, outside vLLM's engine loop.

Why a process by default and not a thread: vLLM's engine-core loop runs Python while the model
runs (it busy-polls its message queues), so any Python thread in that process takes the GIL from
it, and a thread that computes for milliseconds can hold up the next step by as much. The engine
process keeps only the scheduler hook and the forwarder (``llmco2_vllm.plugin.step_forwarder``);
this module is the other end: ``serve`` reads the step contract (``accounting/step_contract.py``)
and drives one ``EnginePipeline`` — step shapes, prediction, attribution, calibration against
NVML, carbon, metric snapshots and per-request results. The reader loop does the work as messages
arrive and, between them, waits exactly until the next measurement window or publication is due.

``python -m llmco2_vllm.accounting.worker REPLY_FD`` runs it as a process at a lower CPU priority
(``WORKER_NICENESS``), reading length-prefixed pickled messages on stdin and answering on
``REPLY_FD``; the pipe connects two processes of the same server, so pickle carries no outside
input (the start message itself is JSON). With ``LLMCO2_WORKER=thread`` the same ``serve`` runs
on a thread of the engine process, fed through a queue. The worker never imports vLLM. It stops
when the engine says so or when its input ends (the engine exited, however it exited), after
accounting what it received.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import select
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from llmco2_vllm.predict.deployment import Deployment
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

WORKER_NICENESS = 10
_FRAME_HEADER = struct.Struct("!I")

Receive = Callable[[float], Any]  # wait up to the timeout for the next message; None on timeout; EOFError at the end
Reply = Callable[[tuple], None]


@dataclass(frozen=True)
class WorkerSpec:
    """What the engine knows that the worker needs; everything else it reads from ``Settings``."""

    deployment: Deployment
    engine: str  # data-parallel rank, the ``engine`` label
    gpu_indices: tuple[int, ...]  # CUDA ordinals of this engine's GPUs, for the energy meter
    snapshot_path: str | None  # metrics file the API server serves (None in multiprocess mode)
    results_dir: str | None  # per-request results store (None without the carbon endpoints)
    remote_ranks: tuple[int, ...] = ()  # worker ranks on other nodes, which report their GPUs' energy
    rank_energy_address: str | None = None  # where they report to (ZeroMQ address)
    step_token_budget: int | None = None  # the most tokens a step schedules (chunked prefill; None: unknown)

    def to_json(self) -> str:
        return json.dumps(
            {
                "deployment": self.deployment.to_dict(),
                "engine": self.engine,
                "gpu_indices": list(self.gpu_indices),
                "snapshot_path": self.snapshot_path,
                "results_dir": self.results_dir,
                "remote_ranks": list(self.remote_ranks),
                "rank_energy_address": self.rank_energy_address,
                "step_token_budget": self.step_token_budget,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        values = json.loads(text)
        return cls(
            Deployment.from_dict(values["deployment"]),
            str(values["engine"]),
            tuple(int(index) for index in values["gpu_indices"]),
            values["snapshot_path"],
            values["results_dir"],
            tuple(int(rank) for rank in values.get("remote_ranks", ())),
            values.get("rank_energy_address"),
            values.get("step_token_budget"),
        )


def _with_remote_ranks(meter: Any, spec: WorkerSpec) -> Any:
    """The local meter joined with the reports of the engine's workers on other nodes."""
    from llmco2_vllm.measure.rank_energy import NodesEnergyMeter, RankEnergyReceiver

    try:
        receiver = RankEnergyReceiver(spec.rank_energy_address, spec.remote_ranks)
    except Exception as error:
        # Without the other nodes' GPUs every window would be short: measure nothing rather than part.
        logger.warning(
            "llmco2: cannot listen for the other nodes' GPU energy on %s (%r); set LLMCO2_RANK_ENERGY_PORT to a "
            "free port open between the nodes. Energy is predicted, not measured.", spec.rank_energy_address, error,
        )  # fmt: skip
        meter.close()
        return None
    logger.info("llmco2: ranks %s on other nodes report their GPU energy to %s", list(spec.remote_ranks), spec.rank_energy_address)
    return NodesEnergyMeter(meter, receiver)


def build_pipeline(spec: WorkerSpec, settings: Settings):
    """Predictor, meter, calibration, grid intensity and results store for one engine."""
    from llmco2_vllm.accounting.pipeline import EnginePipeline
    from llmco2_vllm.carbon.providers import build_intensity_provider
    from llmco2_vllm.predict.predictor import load_predictor
    from llmco2_vllm.serve.results_store import RequestResultStore

    deployment = spec.deployment
    hardware = deployment.hardware
    predictor = load_predictor(settings.predictor, deployment, in_server=True, calibration_file=settings.calibration_file)
    meter = None
    if settings.measure_energy:
        from llmco2_vllm.measure.energy_meter import EnergyMeter

        meter = EnergyMeter(gpu_indices=list(spec.gpu_indices))
        if not meter.available:
            logger.info("llmco2: GPU energy not measured (%s); predictions only", meter.reason)
        elif spec.remote_ranks and spec.rank_energy_address:
            meter = _with_remote_ranks(meter, spec)
    calibrator = None
    if settings.calibration_file:
        from llmco2_vllm.predict.calibration import OnlineCalibrator

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
        deployment.model_name,
        spec.engine,
        Path(spec.snapshot_path) if spec.snapshot_path else None,
        meter=meter,
        calibrator=calibrator,
        embodied=settings.embodied(),
        store=RequestResultStore.in_directory(spec.results_dir) if spec.results_dir else None,
        step_token_budget=spec.step_token_budget,
    )
    logger.info(
        "llmco2: accounting %s on %d x %s (%s), predictor %s, grid intensity %s",
        deployment.model_name,
        hardware.num_gpus,
        hardware.gpu.name,
        hardware.source,
        predictor.name,
        intensity.current().region,
    )
    return pipeline


def serve(receive: Receive, reply: Reply, settings: Settings) -> int:
    """The worker: read the start message, build the pipeline, account every message until ``stop``
    or the end of input, then close the pipeline. Returns an exit status."""
    try:
        message = receive(float("inf"))
        if not message or message[0] != "start":
            raise ValueError(f"expected a start message, got {message!r}")
        pipeline = build_pipeline(WorkerSpec.from_json(message[1]), settings)
    except Exception as error:
        logger.exception("llmco2: the worker could not start; vLLM runs without the plugin")
        reply(("failed", repr(error)))
        return 1
    reply(("ready", pipeline.predictor.name))
    try:
        _account(pipeline, receive, reply)
    except Exception:
        logger.exception("llmco2: the worker lost its input; accounting what it received")
    finally:
        pipeline.close()
    return 0


def _account(pipeline, receive: Receive, reply: Reply) -> None:
    while True:
        try:
            message = receive(pipeline.tick())
        except EOFError:
            return
        if message is None:
            continue  # timed out: the next tick is due
        kind = message[0]
        if kind == "steps":
            _, steps, engine_dropped, engine_queued, errors = message
            try:
                pipeline.note_engine_state(engine_dropped, engine_queued, errors)
                pipeline.process_steps(steps)
            except Exception as error:  # a gap in the pipeline's own guards must not end the accounting
                pipeline.failed("attribute", error)
        elif kind == "sync":  # everything sent before it is accounted: messages are handled in order
            reply(("synced", message[1], pipeline.report()))
        elif kind == "stop":
            return


# -- framing over pipes (both ends) ------------------------------------------------------------
def write_message(stream: BinaryIO, message: tuple) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


def pipe_receiver(fd: int) -> Receive:
    """Read whole frames from a raw pipe; ``select`` on the fd is exact because nothing is buffered in Python."""

    def read_exact(size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            chunk = os.read(fd, remaining)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(timeout: float) -> Any:
        wait = None if timeout == float("inf") else max(0.0, timeout)
        if not select.select([fd], [], [], wait)[0]:
            return None
        (size,) = _FRAME_HEADER.unpack(read_exact(_FRAME_HEADER.size))
        return pickle.loads(read_exact(size))

    return receive


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1 or not arguments[0].isdigit():
        print("usage: python -m llmco2_vllm.accounting.worker REPLY_FD (started by the llmco2 vLLM plugin)", file=sys.stderr)
        return 2
    package_logger = logging.getLogger("llmco2_vllm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [llmco2 worker %(process)d] %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    # Signals meant for the server (Ctrl-C to the process group, systemd's SIGTERM to the whole
    # cgroup) must not cut the accounting short: the worker stops when the engine closes the pipe.
    for ignored in (signal.SIGINT, signal.SIGTERM):
        signal.signal(ignored, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    with os.fdopen(int(arguments[0]), "wb") as replies:
        return serve(pipe_receiver(sys.stdin.fileno()), lambda message: write_message(replies, message), Settings.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
