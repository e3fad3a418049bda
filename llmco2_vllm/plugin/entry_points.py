"""The thin vLLM edge: plugin entry points, the scheduler hook and the /metrics bridge.

- ``register`` (entry point ``vllm.general_plugins``) runs once in every vLLM process. It validates
  the settings (a wrong one stops ``vllm serve`` at start-up), creates the run directory the engine
  and the API server share, and wraps whatever scheduler class vLLM picks (``Scheduler``,
  ``AsyncScheduler`` or a user's ``--scheduler-cls``) in a subclass that records each step.
- ``stat_logger.Llmco2StatLogger`` (entry point ``vllm.stat_logger_plugins``) runs in the API server
  and adds the engines' metrics to the registry vLLM serves on ``/metrics``.

Everything vLLM-specific lives in this package: here, in ``scheduler_hook`` (the hook and
``compact_step``, the only reader of vLLM's step objects), ``step_forwarder`` (the engine side of
the accounting worker) and ``http_endpoints`` (routes and admission middleware on vLLM's API server).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmco2_vllm.plugin.patching import wrap_once
from llmco2_vllm.plugin.placement import engine_placement
from llmco2_vllm.plugin.scheduler_hook import capturing_scheduler
from llmco2_vllm.plugin.worker_hook import wrap_worker_device_init
from llmco2_vllm.settings import Settings, SettingsError

if TYPE_CHECKING:
    from llmco2_vllm.predict.deployment import Deployment

logger = logging.getLogger(__name__)

RUN_DIR_VARIABLE = "LLMCO2_RUN_DIR"
_forwarders: list[Any] = []  # StepForwarder of every engine in this process
_registered = False
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
        _check_files(settings)  # raises with the fix: vLLM stops at start-up
        _ensure_run_dir()
        _wrap_scheduler_selection()
        wrap_worker_device_init()  # worker processes of multi-node engines meter their own GPU
        _registered = True


def _check_files(settings: Settings) -> None:
    """Files the settings name are checked where they are used; here, before vLLM serves, so a bad one
    stops start-up instead of switching the plugin off later in the worker."""
    from llmco2_vllm.carbon.providers import check_intensity_sources
    from llmco2_vllm.predict.calibration import CalibrationFileError, OnlineCalibrator

    check_intensity_sources(settings)
    if settings.calibration_file:
        try:
            OnlineCalibrator.load(settings.calibration_file)
        except CalibrationFileError as error:
            raise SettingsError(f"LLMCO2_CALIBRATION_FILE: {error}") from None


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

    def wrapper(original):
        def get_scheduler_cls(self):
            return capturing_scheduler(original(self), start_accounting)

        return get_scheduler_cls

    wrap_once(SchedulerConfig, "get_scheduler_cls", wrapper)


def describe_deployment(vllm_config: Any, settings: Settings) -> "Deployment":
    """Model and hardware from vLLM's config; the GPUs NVML sees, else the configured target."""
    from llmco2_vllm.measure.gpu_detection import detect_gpus
    from llmco2_vllm.predict.deployment import Deployment
    from llmco2_vllm.predict.hardware import Hardware, UnknownGpuError, find_gpu
    from llmco2_vllm.predict.model_description import ModelDescription

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    model_name = model_config.served_model_name
    if isinstance(model_name, (list, tuple)):
        model_name = model_name[0]
    model = ModelDescription.from_hf_config(
        model_config.hf_text_config,
        name=str(model_name),
        # vLLM's dtype is the compute dtype: the weights' dtype only when the checkpoint is not
        # quantised (fp8 / MXFP4 weights keep their own, per group).
        weight_dtype=None if model_config.quantization else str(model_config.dtype).removeprefix("torch."),
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


def start_accounting(vllm_config: Any):
    """Describe model and hardware from vLLM's config and start the engine's accounting worker.

    Returns the engine's ``StepForwarder``; its worker runs in a process (``LLMCO2_WORKER=process``,
    default) or a thread of this process (``thread``: offline experiments, debugging).
    """
    from llmco2_vllm.accounting.metrics import multiprocess_mode
    from llmco2_vllm.accounting.worker import WorkerSpec
    from llmco2_vllm.plugin.step_forwarder import StepForwarder

    settings = Settings.from_env()
    deployment = describe_deployment(vllm_config, settings)
    hardware, parallel = deployment.hardware, vllm_config.parallel_config
    if hardware.source == "configured":
        logger.info("llmco2: no NVIDIA GPU visible; predicting for the configured target %s", hardware.gpu.name)
    placement = engine_placement(parallel, settings.rank_energy_port)
    run_dir = os.environ.get(RUN_DIR_VARIABLE)
    spec = WorkerSpec(
        deployment=deployment,
        engine=placement.engine,
        gpu_indices=placement.gpu_indices,
        snapshot_path=str(Path(run_dir) / f"engine-{placement.engine}.prom") if run_dir and not multiprocess_mode() else None,
        results_dir=run_dir if run_dir and endpoints_enabled() else None,
        remote_ranks=placement.remote_ranks,
        rank_energy_address=placement.rank_energy_address,
        step_token_budget=_step_token_budget(vllm_config),
    )
    forwarder = StepForwarder(spec, settings)
    _forwarders.append(forwarder)
    return forwarder


def _step_token_budget(vllm_config: Any) -> int | None:
    """vLLM's token budget per step where it chunks prompts to fit it, else None."""
    scheduler = getattr(vllm_config, "scheduler_config", None)
    budget = getattr(scheduler, "max_num_batched_tokens", None)
    if not getattr(scheduler, "enable_chunked_prefill", False) or not isinstance(budget, int) or budget <= 0:
        return None
    return budget


def engine_forwarders() -> list[Any]:
    """The ``StepForwarder`` of each engine running in this process (offline ``LLM`` with in-process
    engine): ``recorder``, ``wait_idle``, ``report`` and ``stop``."""
    return list(_forwarders)
