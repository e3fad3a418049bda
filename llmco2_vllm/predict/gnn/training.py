"""Train the GNN step predictor on the measured static-batch rows.

Run: ``llmco2 train --out llmco2_vllm/data/gnn_default.safetensors``

A row (``load_measurements()``: B requests x P prompt tokens x O output tokens, energy of the whole
batch) is predicted as ``forecast.py`` does: the prefill step (B x P) plus the O-1 decode steps
with contexts P..P+O-2, evaluated at up to ``--samples`` contexts and integrated with the trapezoid
rule. Every step goes through the GNN (``analytic step energy x exp(GNN output)``), so the batch
energy is ``sum_g w_g * A_g * exp(o_g)`` over the row's step graphs (w_g: integration weight, A_g:
analytic phase energy of the step); the loss is the mean absolute error of its log against the
log measured energy.

On a GPU whose datasheet matches no training GPU the predictor multiplies the log correction by
``unseen_hardware_scale`` (0 = the analytic model, 1 = the full correction). The scale is chosen
by leave-one-GPU-type-out cross-validation on the training rows (``choose_unseen_hardware_scale``)
because cross-validation showed that the correction learned on the few training GPUs transfers
only partly to another GPU.

No synthetic rows are added (the optional coverage rows and LLMCO2's focused sampling were not
done); the model only ever sees real measurements.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from llmco2_vllm.predict.gnn.graph import StepGraphBuilder
from llmco2_vllm.predict.gnn.model import GnnEnsemble, hardware_signature, is_known_hardware
from llmco2_vllm.predict.hardware import Hardware, find_gpu
from llmco2_vllm.predict.measurements import load_measurements
from llmco2_vllm.predict.model_description import load_model
from llmco2_vllm.predict.step_shape import StepShape

DEFAULT_SAMPLES = 4
#: Candidate factors on the log correction for GPUs outside the training set (0 = analytic model).
UNSEEN_HARDWARE_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


@functools.lru_cache(maxsize=512)
def builder_for(model: str, gpu: str, num_gpus: int, tensor_parallel: int) -> StepGraphBuilder:
    """As ``BatchPredictor``: pipeline depth = num_gpus / tensor_parallel."""
    pp = max(1, num_gpus // tensor_parallel)
    hardware = Hardware(find_gpu(gpu), tensor_parallel * pp, tensor_parallel, "configured")
    return StepGraphBuilder(load_model(model), hardware, pp)


def decode_contexts(prompt_tokens: int, output_tokens: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled decode contexts and their weights: sum(w * per-step value) = forecast.py's integral."""
    steps = output_tokens - 1
    if steps <= 0:
        return np.zeros(0), np.zeros(0)
    contexts = np.unique(np.linspace(prompt_tokens, prompt_tokens + steps - 1, min(samples, steps)).round())
    if len(contexts) == 1:
        return contexts, np.array([float(steps)])
    diff = np.diff(contexts)
    weights = np.zeros(len(contexts))
    weights[:-1] += diff / 2
    weights[1:] += diff / 2
    return contexts, weights / (contexts[-1] - contexts[0]) * steps


def row_graphs(row: dict[str, Any], samples: int = DEFAULT_SAMPLES) -> list[tuple[Data, int, float]]:
    """(graph, phase 0=prefill/1=decode, weight x analytic phase energy) for every step of a row."""
    builder = builder_for(row["model"], row["gpu"], int(row["num_gpus"]), int(row["tensor_parallel"]))
    b, p, o = int(row["batch_size"]), int(row["prompt_tokens"]), int(row["output_tokens"])
    hf = str(row.get("software", "")).startswith("hf-transformers")
    graph, pred = builder.build(StepShape.static_batch_prefill(b, p), hf)
    out = [(graph, 0, pred.prefill_energy_j + pred.decode_energy_j)]
    for context, weight in zip(*decode_contexts(p, o, samples)):
        graph, pred = builder.build(StepShape.static_batch_decode(b, int(context)), hf)
        out.append((graph, 1, weight * pred.decode_energy_j))
    return out


@dataclass
class RowDataset:
    """All step graphs of a list of rows, flattened, with the row each graph belongs to."""

    rows: list[dict[str, Any]]
    graphs: list[Data]
    graph_row: torch.Tensor  # (graphs,) row index
    graph_phase: torch.Tensor  # (graphs,) 0 prefill, 1 decode
    graph_log_base: torch.Tensor  # (graphs,) log(weight x analytic phase energy)
    target_log: torch.Tensor  # (rows,) log measured energy

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], samples: int = DEFAULT_SAMPLES) -> "RowDataset":
        graphs, row_index, phase, base = [], [], [], []
        for i, row in enumerate(rows):
            for graph, ph, energy in row_graphs(row, samples):
                graphs.append(graph)
                row_index.append(i)
                phase.append(ph)
                base.append(math.log(max(energy, 1e-30)))
        return cls(list(rows), graphs, torch.tensor(row_index), torch.tensor(phase), torch.tensor(base, dtype=torch.float32),
                   torch.tensor([math.log(r["energy_j"]) for r in rows], dtype=torch.float32))

    def subset(self, row_ids: Sequence[int]) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch of the rows' graphs, local row index, phase, log base, and the rows' targets."""
        row_ids = list(row_ids)
        if not hasattr(self, "_row_graphs"):
            self._row_graphs: dict[int, list[int]] = {}
            for g, r in enumerate(self.graph_row.tolist()):
                self._row_graphs.setdefault(r, []).append(g)
        keep = [g for r in row_ids for g in self._row_graphs[r]]
        batch = Batch.from_data_list([self.graphs[g] for g in keep])
        rows = torch.tensor([i for i, r in enumerate(row_ids) for _ in self._row_graphs[r]])
        return batch, rows, self.graph_phase[keep], self.graph_log_base[keep], self.target_log[row_ids]

    def analytic_energy(self) -> np.ndarray:
        """The analytic prediction of every row through the same step sampling (GNN output 0)."""
        out = np.zeros(len(self.rows))
        np.add.at(out, self.graph_row.numpy(), np.exp(self.graph_log_base.numpy().astype(np.float64)))
        return out


def row_log_energy(log_factors: torch.Tensor, rows: torch.Tensor, phase: torch.Tensor, base: torch.Tensor, n_rows: int) -> torch.Tensor:
    """log sum_g exp(base_g + o_g[phase_g]) per row; ``log_factors`` is (..., graphs, 2)."""
    chosen = torch.gather(log_factors, -1, phase.expand(*log_factors.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    terms = base + chosen  # (..., graphs)
    lead = terms.shape[:-1]
    flat = terms.reshape(-1, terms.shape[-1])
    out = []
    for t in flat:
        m = torch.full((n_rows,), -1e30).scatter_reduce(0, rows, t.detach(), "amax", include_self=True)
        s = torch.zeros(n_rows).index_add(0, rows, torch.exp(t - m[rows]))
        out.append(torch.log(s) + m)
    return torch.stack(out).reshape(*lead, n_rows)


def train_ensemble(
    data: RowDataset,
    row_ids: Sequence[int],
    members: int = 5,
    epochs: int = 40,
    lr: float = 3e-3,
    seed: int = 0,
    rows_per_batch: int = 24,
    verbose: bool = False,
) -> GnnEnsemble:
    """Mini-batch training (rows shuffled each epoch) of each member on ``row_ids``: MAE of log batch energy."""
    row_ids = list(row_ids)
    full = data.subset(row_ids)
    ensemble = GnnEnsemble(members)
    for k, member in enumerate(ensemble.members):
        torch.manual_seed(seed * 1000 + k)
        generator = np.random.default_rng(seed * 1000 + k)
        fresh = type(member)(member.x_mean.numel(), member.u_mean.numel())
        member.load_state_dict(fresh.state_dict())
        member.set_normalisation(full[0].x, full[0].u)
        optimizer = torch.optim.AdamW(member.parameters(), lr=lr, weight_decay=1e-4)
        chunks = math.ceil(len(row_ids) / rows_per_batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * chunks, pct_start=0.15)
        member.train()
        for epoch in range(epochs):
            order = generator.permutation(row_ids)
            total = 0.0
            for c in range(chunks):
                chunk = order[c * rows_per_batch:(c + 1) * rows_per_batch].tolist()
                batch, rows, phase, base, target = data.subset(chunk)
                optimizer.zero_grad()
                out = member(batch.x, batch.edge_index, batch.batch, batch.u)
                loss = (row_log_energy(out, rows, phase, base, len(chunk)) - target).abs().mean()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(chunk)
            if verbose and (epoch % 10 == 0 or epoch == epochs - 1):
                print(f"  member {k} epoch {epoch:3d} train log-MAE {total / len(row_ids):.4f}", flush=True)
    batch, rows, phase, base, target = full
    logs = ensemble.log_factors(batch)
    pred = row_log_energy(logs.mean(0), rows, phase, base, len(row_ids))
    residual = (target - pred).numpy()
    ensemble.residual_quantiles = (float(np.quantile(residual, 0.05)), float(np.quantile(residual, 0.95)))
    ensemble.training_hardware = training_hardware(data, row_ids)
    ensemble.eval()
    return ensemble


def training_hardware(data: RowDataset, row_ids: Sequence[int]) -> list[list[float]]:
    """Distinct hardware signatures of the rows' GPUs."""
    out: list[list[float]] = []
    for i in row_ids:
        signature = hardware_signature(find_gpu(data.rows[i]["gpu"]))
        if not is_known_hardware(signature, out):
            out.append(signature)
    return out


def choose_unseen_hardware_scale(
    data: RowDataset, row_ids: Sequence[int], members: int, epochs: int, seed: int = 0, log: list[str] | None = None
) -> tuple[float, tuple[float, float]]:
    """Scale of the log correction on an unseen GPU, by leave-one-GPU-type-out CV inside ``row_ids``.

    Each GPU's rows are predicted by an ensemble trained without them; the scale in
    ``UNSEEN_HARDWARE_SCALES`` with the lowest MAPE on those held-out predictions wins (ties: the
    smaller one, i.e. the more conservative). Returns it and the 5 %/95 % quantiles of
    log(measured / predicted) at that scale (the interval on unseen GPUs). Only rows in
    ``row_ids`` are used, so an outer CV fold's test rows never influence the choice.
    """
    row_ids = list(row_ids)
    groups: dict[str, list[int]] = {}
    for i in row_ids:
        groups.setdefault(data.rows[i]["gpu"], []).append(i)
    if len(groups) < 2:
        return 1.0, (0.0, 0.0)
    held_logs: dict[int, tuple[torch.Tensor, ...]] = {}
    for gpu, test in sorted(groups.items()):
        held = set(test)
        ensemble = train_ensemble(data, [i for i in row_ids if i not in held], members, epochs, seed=seed)
        batch, rows, phase, base, target = data.subset(test)
        held_logs[len(held_logs)] = (ensemble.log_factors(batch).mean(0), rows, phase, base, target, len(test))
        if log is not None:
            log.append(f"    inner fold {gpu!r}: {len(test)} rows")
    best: tuple[float, float, np.ndarray] | None = None
    for scale in UNSEEN_HARDWARE_SCALES:
        residuals = np.concatenate([
            (target - row_log_energy(scale * logs, rows, phase, base, n)).numpy()
            for logs, rows, phase, base, target, n in held_logs.values()
        ])
        mape = float(np.mean(np.abs(np.expm1(-residuals))))
        if best is None or mape < best[1] - 1e-12:
            best = (scale, mape, residuals)
    scale, _, residuals = best
    return scale, (float(np.quantile(residuals, 0.05)), float(np.quantile(residuals, 0.95)))


def train_with_shrinkage(
    data: RowDataset, row_ids: Sequence[int], members: int, epochs: int, seed: int = 0,
    scale_members: int = 2, scale_epochs: int = 25, log: list[str] | None = None, verbose: bool = False,
) -> GnnEnsemble:
    """``train_ensemble`` plus ``choose_unseen_hardware_scale`` (with the cheaper CV settings)."""
    ensemble = train_ensemble(data, row_ids, members, epochs, seed=seed, verbose=verbose)
    scale, quantiles = choose_unseen_hardware_scale(data, row_ids, scale_members, scale_epochs, seed, log)
    ensemble.unseen_hardware_scale, ensemble.unseen_residual_quantiles = scale, quantiles
    return ensemble


def row_scales(ensemble: GnnEnsemble, data: RowDataset, row_ids: Sequence[int]) -> np.ndarray:
    """Per row: the correction scale the predictor applies on the row's GPU (1 seen, <= 1 unseen)."""
    return np.array([ensemble.correction_scale(find_gpu(data.rows[i]["gpu"])) for i in row_ids])


def predict_rows(ensemble: GnnEnsemble, data: RowDataset, row_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(central, low, high) batch energy of the rows (J)."""
    row_ids = list(row_ids)
    batch, rows, phase, base, _ = data.subset(row_ids)
    scales = row_scales(ensemble, data, row_ids)
    logs = ensemble.log_factors(batch) * torch.tensor(scales, dtype=torch.float32)[rows].unsqueeze(-1)  # (M, G, 2)
    central = row_log_energy(logs.mean(0), rows, phase, base, len(row_ids)).numpy()
    per_member = row_log_energy(logs, rows, phase, base, len(row_ids)).numpy()  # (M, rows)
    unseen = np.array([not ensemble.knows(find_gpu(data.rows[i]["gpu"])) for i in row_ids])
    widen_lo = np.where(unseen, min(ensemble.unseen_residual_quantiles[0], 0.0), min(ensemble.residual_quantiles[0], 0.0))
    widen_hi = np.where(unseen, max(ensemble.unseen_residual_quantiles[1], 0.0), max(ensemble.residual_quantiles[1], 0.0))
    lo = np.quantile(per_member, 0.1, axis=0) + widen_lo
    hi = np.quantile(per_member, 0.9, axis=0) + widen_hi
    return np.exp(central), np.exp(lo), np.exp(hi)


def measurements_sha256() -> str:
    data = resources.files("llmco2_vllm").joinpath("data/measurements.csv").read_bytes()
    return hashlib.sha256(data).hexdigest()


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    rows = load_measurements()
    data = RowDataset.from_rows(rows, args.samples)
    print(f"{len(rows)} rows, {len(data.graphs)} step graphs ({time.perf_counter() - start:.1f} s)", flush=True)
    log: list[str] = []
    ensemble = train_with_shrinkage(data, range(len(rows)), args.members, args.epochs, seed=args.seed, log=log, verbose=True)
    print("\n".join(log), flush=True)
    print(f"unseen-hardware scale {ensemble.unseen_hardware_scale} (leave-one-GPU-type-out CV on the training rows)",
          flush=True)
    seconds = time.perf_counter() - start
    central, _, _ = predict_rows(ensemble, data, range(len(rows)))
    measured = np.array([r["energy_j"] for r in rows])
    mape = float(np.mean(np.abs(central - measured) / measured) * 100)
    ensemble.metadata = {
        "trained_on": "load_measurements() (kv_cache rows)", "rows": len(rows),
        "measurements_sha256": measurements_sha256(), "epochs": args.epochs, "samples": args.samples,
        "seed": args.seed, "train_seconds": round(seconds, 1), "in_sample_mape_percent": round(mape, 2),
        "unseen_hardware_scale_cv": "leave-one-GPU-type-out on the training rows, 2 members x 25 epochs per fold",
        "command": f"llmco2 train --out {args.out} --members {args.members} --epochs {args.epochs}",
    }
    ensemble.save(args.out)
    print(f"trained {args.members} members in {seconds:.1f} s; in-sample MAPE {mape:.1f} % -> {args.out}")
    return 0

