"""vLLM stat-logger plugin (entry point ``vllm.stat_logger_plugins``): the engines' metrics on /metrics.

Runs in the API server. The accounting worker of each engine writes its registry as a snapshot
file in the run directory; this adds a collector that serves those files from the registry vLLM
serves on ``/metrics`` (one API server; with several, vLLM's ``PROMETHEUS_MULTIPROC_DIR`` carries them).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from llmco2_vllm.plugin.entry_points import RUN_DIR_VARIABLE
from llmco2_vllm.settings import Settings

logger = logging.getLogger(__name__)

_collector_registered = False
_lock = threading.Lock()


def _register_snapshot_collector() -> None:
    """Serve the engines' snapshot files from this API server's /metrics (one API server case)."""
    global _collector_registered
    from prometheus_client import REGISTRY

    from llmco2_vllm.accounting.metrics import SnapshotCollector, multiprocess_mode

    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    with _lock:
        if _collector_registered or multiprocess_mode() or not run_dir:
            return
        REGISTRY.register(SnapshotCollector(Path(run_dir)))
        _collector_registered = True


class Llmco2StatLogger(StatLoggerBase):  # type: ignore[misc, valid-type]
    """vLLM stat-logger plugin: connects the engines' metrics to this API server's /metrics."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        try:
            if Settings.from_env().enabled:
                _register_snapshot_collector()
        except Exception:
            logger.exception("llmco2: could not attach metrics to /metrics")

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass
