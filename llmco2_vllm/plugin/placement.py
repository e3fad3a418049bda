"""Where an engine's GPUs are, read from vLLM's parallel config (engine and worker processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnginePlacement:
    """Where one engine's GPUs are, read from vLLM's parallel config."""

    engine: str  # the data-parallel index: the ``engine`` label, as vLLM's own metrics have it
    gpu_indices: tuple[int, ...]  # CUDA ordinals of the engine's GPUs on this node
    remote_ranks: tuple[int, ...]  # worker ranks on other nodes: they meter their GPUs and report them
    rank_energy_address: str | None  # where they report to (None on one node)


def engine_placement(parallel: Any, rank_energy_port: int) -> EnginePlacement:
    """The engine's GPUs as vLLM places its workers (``gpu_worker.init_device`` in 0.32 and 0.33).

    Worker ``local_rank`` r of local data-parallel rank d uses logical GPU ``d x world + r`` when the
    engine fits one node (the multiprocessing executor), else ``r``; a logical GPU is an index into
    ``assigned_physical_gpu_ids`` where vLLM set them (all the node's, or only this engine's shard),
    else a CUDA ordinal. Across nodes (``--nnodes``),
    this node holds ranks ``0 .. world / nodes - 1``; the others report their own energy.
    """
    # vLLM resets data_parallel_rank to 0 in each engine of a dense model (independent replicas) and
    # keeps the replica's number in data_parallel_index.
    index = getattr(parallel, "data_parallel_index", None)
    engine = int(index if index is not None else getattr(parallel, "data_parallel_rank", 0) or 0)
    world = int(parallel.tensor_parallel_size) * int(parallel.pipeline_parallel_size)
    world *= int(getattr(parallel, "prefill_context_parallel_size", 1) or 1)
    nodes = max(int(getattr(parallel, "nnodes_within_dp", 1) or 1), 1)
    local_world = max(world // nodes, 1)
    start = 0
    backend = getattr(parallel, "distributed_executor_backend", None)
    if nodes == 1 and backend not in ("ray", "external_launcher"):
        start = int(getattr(parallel, "data_parallel_rank_local", 0) or 0) * world
    logical = range(start, start + local_world)
    assigned = getattr(parallel, "assigned_physical_gpu_ids", None)
    if assigned:
        if start + local_world > len(assigned):
            # Only this data-parallel rank's shard (vLLM shards the list per engine for Ray and for
            # platforms that isolate devices by environment): its first GPU is the engine's first.
            logical = range(local_world)
        visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
        physical = [int(assigned[i]) for i in logical if i < len(assigned)]
        ordinals = tuple(visible.index(str(p)) if str(p) in visible else p for p in physical) if visible else tuple(physical)
    else:
        ordinals = tuple(logical)
    remote = tuple(range(local_world, world)) if nodes > 1 else ()
    address = f"tcp://{parallel.master_addr}:{rank_energy_port + engine}" if remote else None
    return EnginePlacement(str(engine), ordinals, remote, address)
