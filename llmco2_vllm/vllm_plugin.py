"""The thin vLLM edge: plugin entry points, the scheduler hook and the /metrics bridge.

- ``register`` (entry point ``vllm.general_plugins``) runs once in every vLLM process. It validates
  the settings (a wrong one stops ``vllm serve`` at start-up), creates the run directory the engine
  and the API server share, and wraps whatever scheduler class vLLM picks (``Scheduler``,
  ``AsyncScheduler`` or a user's ``--scheduler-cls``) in a subclass that records each step.
- ``Llmco2StatLogger`` (entry point ``vllm.stat_logger_plugins``) runs in the API server and adds
  the engines' metrics to the registry vLLM serves on ``/metrics``.

Everything vLLM-version-specific lives here and in ``capture.compact_step`` (the only reader of
vLLM's step objects; it runs in the engine process, the rest of the plugin in its worker process).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import Settings

logger = logging.getLogger("llmco2_vllm")

RUN_DIR_VARIABLE = "LLMCO2_RUN_DIR"
_pipelines: list[Any] = []  # EnginePipeline of every engine in this process
_registered = False
_collector_registered = False
_lock = threading.Lock()


def register() -> None:
    """vLLM general plugin: called once per process, before the engine builds its scheduler."""
    global _registered
    with _lock:
        if _registered:
            return
        settings = Settings.from_env()  # raises SettingsError: vLLM stops at start-up with our message
        if not settings.enabled:
            logger.info("llmco2: disabled by LLMCO2_ENABLED")
            _registered = True
            return
        _ensure_run_dir()
        _wrap_scheduler_selection()
        _registered = True


def _ensure_run_dir() -> None:
    """The first vLLM process creates the directory; its children (engine, API servers) inherit it."""
    if os.environ.get(RUN_DIR_VARIABLE):
        return
    directory = tempfile.mkdtemp(prefix="llmco2-")
    os.environ[RUN_DIR_VARIABLE] = directory
    creator = os.getpid()
    atexit.register(lambda: os.getpid() == creator and shutil.rmtree(directory, ignore_errors=True))


def _wrap_scheduler_selection() -> None:
    from vllm.config.scheduler import SchedulerConfig

    original = SchedulerConfig.get_scheduler_cls
    if getattr(original, "_llmco2_wrapped", False):
        return

    @functools.wraps(original)
    def get_scheduler_cls(self):
        return capturing_scheduler(original(self))

    get_scheduler_cls._llmco2_wrapped = True  # type: ignore[attr-defined]
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls


@functools.cache
def capturing_scheduler(base: type) -> type:
    """A subclass of vLLM's chosen scheduler that records every step for the plugin."""

    class CapturingScheduler(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._llmco2_started: dict[int, float] = {}
            self._llmco2 = self._llmco2_recorder = None
            try:
                self._llmco2 = build_engine_pipeline(self.vllm_config)
                self._llmco2_recorder = self._llmco2.recorder
            except Exception:
                logger.exception("llmco2: could not start; vLLM runs without the plugin")

        def schedule(self, *args: Any, **kwargs: Any):
            started = time.perf_counter()
            output = super().schedule(*args, **kwargs)
            if self._llmco2 is not None:
                self._llmco2_started[id(output)] = started
            return output

        def update_from_output(self, scheduler_output, model_runner_output):
            result = super().update_from_output(scheduler_output, model_runner_output)
            recorder = self._llmco2_recorder
            if recorder is not None:
                try:
                    started = self._llmco2_started.pop(id(scheduler_output), None)
                    if started is not None:
                        recorder.record(scheduler_output, result, started)
                    if len(self._llmco2_started) > 64:  # outputs vLLM never updated (aborted steps)
                        self._llmco2_started.clear()
                except Exception:
                    pass  # never raise into vLLM's loop; the worker counts what is missing
            return result

        def shutdown(self) -> None:
            if self._llmco2 is not None:
                try:
                    self._llmco2.stop()
                except Exception:
                    logger.exception("llmco2: error while stopping")
            super().shutdown()

    CapturingScheduler.__name__ = CapturingScheduler.__qualname__ = f"Llmco2{base.__name__}"
    return CapturingScheduler


@dataclass(frozen=True)
class Deployment:
    """What the plugin predicts for: the served model on its GPUs."""

    model_name: str
    model: Any  # ModelDescription
    hardware: Any  # Hardware
    pipeline_parallel: int


def describe_deployment(vllm_config: Any, settings: Settings) -> Deployment:
    """Model and hardware from vLLM's config; the GPUs NVML sees, else the configured target."""
    from .hardware import Hardware, UnknownGpuError, detect_gpus, find_gpu
    from .model_description import ModelDescription

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    model_name = model_config.served_model_name
    if isinstance(model_name, (list, tuple)):
        model_name = model_name[0]
    model = ModelDescription.from_hf_config(
        model_config.hf_text_config,
        name=str(model_name),
        weight_dtype=str(model_config.dtype).removeprefix("torch."),
        quantization=model_config.quantization,
        kv_cache_dtype=vllm_config.cache_config.cache_dtype,
    )
    tensor_parallel = int(parallel.tensor_parallel_size)
    pipeline_parallel = int(parallel.pipeline_parallel_size)
    gpu, source = find_gpu(settings.target_gpu), "configured"
    detected = detect_gpus()
    if detected:
        try:
            gpu, source = find_gpu(detected[0]), "nvml"
        except UnknownGpuError:
            logger.warning("llmco2: GPU %r is not in the catalog; predicting for %s", detected[0], gpu.name)
    hardware = Hardware(gpu, tensor_parallel * pipeline_parallel, tensor_parallel, source)
    return Deployment(str(model_name), model, hardware, pipeline_parallel)


def endpoints_enabled() -> bool:
    """vLLM loads the plugin's HTTP endpoints only when ``VLLM_PLUGINS`` names it."""
    return "llmco2" in [name.strip() for name in os.environ.get("VLLM_PLUGINS", "").split(",")]


def build_engine_pipeline(vllm_config: Any):
    """Describe model and hardware from vLLM's config and start the engine's accounting.

    ``LLMCO2_WORKER=process`` (default): a worker process does the accounting and this process
    only records and forwards steps (see ``worker_process``). ``thread``: a worker thread in
    this process (offline experiments, debugging).
    """
    from .metrics import multiprocess_mode
    from .worker_process import PipelineSpec, WorkerProcess, build_pipeline

    settings = Settings.from_env()
    deployment = describe_deployment(vllm_config, settings)
    hardware, parallel = deployment.hardware, vllm_config.parallel_config
    if hardware.source == "configured":
        logger.info("llmco2: no NVIDIA GPU visible; predicting for the configured target %s", hardware.gpu.name)
    engine = str(getattr(parallel, "data_parallel_rank", 0) or 0)
    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    # This engine's GPUs: its TP x PP ranks, offset by its local data-parallel rank.
    world = hardware.num_gpus
    local_rank = int(getattr(parallel, "data_parallel_rank_local", 0) or 0)
    spec = PipelineSpec(
        model_name=deployment.model_name,
        model=deployment.model,
        hardware=hardware,
        pipeline_parallel=deployment.pipeline_parallel,
        engine=engine,
        gpu_indices=tuple(range(local_rank * world, (local_rank + 1) * world)),
        snapshot_path=str(Path(run_dir) / f"engine-{engine}.prom") if run_dir and not multiprocess_mode() else None,
        results_dir=run_dir if run_dir and endpoints_enabled() else None,
    )
    if settings.worker == "thread":
        pipeline = build_pipeline(spec, settings)
        pipeline.start()
    else:
        pipeline = WorkerProcess(spec, settings)
    _pipelines.append(pipeline)
    return pipeline


def engine_pipelines() -> list[Any]:
    """The accounting of the engines running in this process (offline ``LLM`` with in-process engine):
    ``WorkerProcess`` or, with ``LLMCO2_WORKER=thread``, ``EnginePipeline``; both have ``recorder``,
    ``wait_idle``, ``report`` and ``stop``."""
    return list(_pipelines)


def _register_snapshot_collector() -> None:
    """Serve the engines' snapshot files from this API server's /metrics (one API server case)."""
    global _collector_registered
    from prometheus_client import REGISTRY

    from .metrics import SnapshotCollector, multiprocess_mode

    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    with _lock:
        if _collector_registered or multiprocess_mode() or not run_dir:
            return
        REGISTRY.register(SnapshotCollector(Path(run_dir)))
        _collector_registered = True


try:
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # vLLM absent: the rest of the package works without it
    StatLoggerBase = object  # type: ignore[misc, assignment]


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
