"""Which NVIDIA GPUs this process may use, read through NVML with CUDA_VISIBLE_DEVICES applied."""

from __future__ import annotations

import os
from typing import Any


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_handles(nvml: Any, handles: list[Any], visible: str) -> list[Any]:
    """Apply CUDA_VISIBLE_DEVICES semantics: indexes or (prefixes of) GPU-/MIG- UUIDs.

    Like CUDA, parsing stops at the first entry that matches nothing. Indexes are
    NVML (PCI bus) order, which equals CUDA order when CUDA_DEVICE_ORDER=PCI_BUS_ID.
    """
    selected: list[Any] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            if int(entry) >= len(handles):
                break
            selected.append(handles[int(entry)])
            continue
        match = _handle_by_uuid(nvml, handles, entry) if entry.startswith(("GPU-", "MIG-")) else None
        if match is None:
            break
        selected.append(match)
    return selected


def _handle_by_uuid(nvml: Any, handles: list[Any], uuid_prefix: str) -> Any | None:
    """Find a GPU (or MIG device) whose UUID starts with ``uuid_prefix``."""
    for handle in handles:
        if as_text(nvml.nvmlDeviceGetUUID(handle)).startswith(uuid_prefix):
            return handle
        if uuid_prefix.startswith("MIG-") and hasattr(nvml, "nvmlDeviceGetMigDeviceHandleByIndex"):
            for mig_index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
                except Exception:  # empty MIG slot
                    continue
                if as_text(nvml.nvmlDeviceGetUUID(mig)).startswith(uuid_prefix):
                    return mig
    return None


def detect_gpus(pynvml_module: Any = None) -> list[str] | None:
    """NVML names of the GPUs this process may use, or None when NVML is unavailable.

    Never raises: a machine without NVIDIA GPUs or drivers must still run the plugin
    (it then needs a configured target GPU). MIG devices keep their NVML name
    (``... MIG 1g.5gb``), which ``find_gpu`` maps to the parent GPU.
    """
    nvml = pynvml_module
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]  # lazy: optional at run time
        except Exception:
            return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            handles = visible_handles(nvml, handles, visible)
        return [as_text(nvml.nvmlDeviceGetName(h)) for h in handles]
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
