"""The worker-side hook: in a multi-node engine, each vLLM worker on another node meters its own GPU.

``register()`` wraps ``WorkerWrapperBase.init_device`` in every vLLM process; only worker processes
call it. After vLLM has picked the worker's device, a worker on a node other than its engine's
starts a ``RankEnergyReporter`` (``measure/rank_energy.py``) that sends its GPU's energy to the
engine's accounting worker. Workers on the engine's node do nothing: the engine meters them.
Nothing here may break a worker: every failure is logged once and metering goes without that GPU
(the engine then sees the rank missing and does not learn from those windows).
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from llmco2_vllm.plugin.patching import wrap_once
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

_reporters: list[Any] = []


def wrap_worker_device_init() -> None:
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    def wrapper(original):
        def init_device(self):
            result = original(self)
            try:
                start_rank_energy_reporter(self.worker, self.vllm_config)
            except Exception:
                logger.exception("llmco2: could not start this worker's GPU energy reporter; its GPU is not metered")
            return result

        return init_device

    wrap_once(WorkerWrapperBase, "init_device", wrapper)


def start_rank_energy_reporter(worker: Any, vllm_config: Any) -> Any:
    """Start the reporter if this worker runs on another node than its engine; returns it (or None)."""
    from llmco2_vllm.plugin.placement import engine_placement

    parallel = vllm_config.parallel_config
    if int(getattr(parallel, "nnodes_within_dp", 1) or 1) <= 1 or int(parallel.node_rank_within_dp) == 0:
        return None
    settings = Settings.from_env()
    if not settings.enabled or not settings.measure_energy:
        return None
    placement = engine_placement(parallel, settings.rank_energy_port)
    rank = int(worker.rank)
    if rank not in placement.remote_ranks or placement.rank_energy_address is None:
        return None
    device = getattr(worker, "device", None)
    # vLLM has set the worker's CUDA device (cuda:N, an ordinal among the visible GPUs); on other
    # platforms its local rank is the best guess.
    ordinal = device.index if getattr(device, "type", None) == "cuda" and device.index is not None else int(worker.local_rank)
    from llmco2_vllm.measure.rank_energy import RankEnergyReporter

    reporter = RankEnergyReporter(placement.rank_energy_address, rank, [ordinal])
    _reporters.append(reporter)
    atexit.register(reporter.close)
    logger.info(
        "llmco2: rank %d meters GPU %d (%s) and reports to %s",
        rank, ordinal, reporter.meter.reason or ("available" if reporter.meter.available else "unavailable"),
        placement.rank_energy_address,
    )  # fmt: skip
    return reporter
