"""A scripted stand-in for the slice of ``pynvml`` the plugin uses (no GPU needed).

Tests script each ``FakeGpu`` by assigning its attributes (counter, power, errors, MIG) and pass
``FakeNvml(gpus)`` as ``pynvml_module``.
"""

from __future__ import annotations


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError: the error code is in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeGpu:
    """One GPU (also its NVML handle). Tests script it by assigning the attributes."""

    def __init__(self, name: str = "NVIDIA H100 80GB HBM3", uuid: str = "GPU-0000", name_as_bytes: bool = True) -> None:
        self.name = name
        self.uuid = uuid
        self.name_as_bytes = name_as_bytes  # older pynvml returns bytes, newer str
        self.counter_mj = 0
        self.counter_error: int | None = None  # raise this NVML code on counter reads
        self.power_mw = 0
        self.power_error: int | None = None
        self.mig_mode = 0
        self.mig_devices: list[FakeMigDevice] = []
        self.counter_reads = 0


class FakeMigDevice:
    def __init__(self, uuid: str, parent: FakeGpu) -> None:
        self.uuid = uuid
        self.parent = parent


class FakeNvml:
    """The slice of pynvml the energy meter and GPU detection use."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    NVML_DEVICE_MIG_ENABLE = 1
    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.calls: list[str] = []  # "init" and "shutdown", in order (failed inits included)

    @property
    def shutdown_calls(self) -> int:
        return self.calls.count("shutdown")

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        return next(gpu for gpu in self.gpus if gpu.uuid == uuid)

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        return self.gpus.index(handle)

    def nvmlDeviceGetUUID(self, handle: FakeGpu | FakeMigDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes | str:
        return handle.name.encode() if handle.name_as_bytes else handle.name

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        handle.counter_reads += 1
        if handle.counter_error is not None:
            raise FakeNVMLError(handle.counter_error)
        return handle.counter_mj

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        if handle.power_error is not None:
            raise FakeNVMLError(handle.power_error)
        return handle.power_mw

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> list[int]:
        return [handle.mig_mode, handle.mig_mode]  # [current, pending]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeGpu) -> int:
        return len(handle.mig_devices)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeGpu, index: int) -> FakeMigDevice:
        return handle.mig_devices[index]

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, mig: FakeMigDevice) -> FakeGpu:
        return mig.parent
