"""GNN step predictor: a learned log-space correction of the analytic (roofline) step energy.

Each step becomes an operator graph (``operator_graph.py``). A small GraphSAGE network (2 layers,
hidden 64, residual connections, message passing in both directions of the data-flow edges) pools the node embeddings
(mean + max), concatenates an MLP embedding of the graph-level features and predicts two numbers,
one from a prefill head and one from a decode head: the log correction of the analytic prefill and
decode energy of the step (``prediction = analytic x exp(output)``; outputs are bounded to
+-``MAX_LOG_CORRECTION`` by a tanh so a wild input cannot produce a wild prediction).
Time is not trained: the analytic phase time is scaled by the same factor as its energy.

An ensemble of members trained from different seeds gives the central value (mean of the members'
log factors) and an uncertainty interval: the members' spread, widened by the quantiles of the
training residuals (``GnnEnsemble.interval``).

Checkpoints are ``.safetensors`` (loaded with ``safetensors.torch.load_file`` only, never pickle)
plus a JSON sidecar with the same stem holding the configuration and metadata.
"""

from __future__ import annotations

import json
import math
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import SAGEConv, global_max_pool, global_mean_pool

from llmco2_vllm.predict.gnn.graph import GRAPH_FEATURES, NODE_FEATURES, StepGraphBuilder
from llmco2_vllm.predict.gnn.table import CorrectionTable, corrected_static_batch
from llmco2_vllm.predict.hardware import Hardware
from llmco2_vllm.predict.model_description import ModelDescription
from llmco2_vllm.predict.predictor import AnalyticPredictor, StepPrediction, prediction_from_cost
from llmco2_vllm.predict.step_shape import StepShape

MAX_LOG_CORRECTION = 2.0
#: Standardised inputs are clipped to +-this: limits extrapolation to unseen GPUs / architectures.
MAX_ABS_Z = 4.0
DEFAULT_CHECKPOINT = "data/gnn_default.safetensors"


class StepGNN(nn.Module):
    """One ensemble member: GraphSAGE trunk + graph-feature MLP + prefill and decode heads."""

    def __init__(self, node_dim: int, graph_dim: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("x_mean", torch.zeros(node_dim))
        self.register_buffer("x_std", torch.ones(node_dim))
        self.register_buffer("u_mean", torch.zeros(graph_dim))
        self.register_buffer("u_std", torch.ones(graph_dim))
        self.node_in = nn.Linear(node_dim, hidden)
        self.convs = nn.ModuleList(SAGEConv(hidden, hidden) for _ in range(layers))
        self.graph_mlp = nn.Sequential(nn.Linear(graph_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.trunk = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.prefill_head = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1))
        self.decode_head = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1))
        for head in (self.prefill_head, self.decode_head):  # start at the analytic prediction
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def set_normalisation(self, x: torch.Tensor, u: torch.Tensor) -> None:
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(x.std(0).clamp_min(0.05))
        self.u_mean.copy_(u.mean(0))
        self.u_std.copy_(u.std(0).clamp_min(0.05))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(graphs, 2) bounded log corrections: column 0 prefill, column 1 decode."""
        h = torch.relu(self.node_in(((x - self.x_mean) / self.x_std).clamp(-MAX_ABS_Z, MAX_ABS_Z)))
        both = torch.cat([edge_index, edge_index.flip(0)], dim=1)  # messages along and against the data flow
        for conv in self.convs:
            h = h + torch.relu(conv(h, both))
        pooled = torch.cat([global_mean_pool(h, batch), global_max_pool(h, batch)], dim=1)
        g = self.graph_mlp(((u - self.u_mean) / self.u_std).clamp(-MAX_ABS_Z, MAX_ABS_Z))
        z = self.trunk(torch.cat([pooled, g], dim=1))
        out = torch.cat([self.prefill_head(z), self.decode_head(z)], dim=1)
        return MAX_LOG_CORRECTION * torch.tanh(out / MAX_LOG_CORRECTION)


class GnnEnsemble(nn.Module):
    """Members trained from different seeds, plus what the interval needs."""

    def __init__(self, members: int = 5, hidden: int = 64, layers: int = 2, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = {"members": members, "hidden": hidden, "layers": layers,
                       "node_features": list(NODE_FEATURES), "graph_features": list(GRAPH_FEATURES)}
        self.members = nn.ModuleList(
            StepGNN(len(NODE_FEATURES), len(GRAPH_FEATURES), hidden, layers) for _ in range(members)
        )
        # log(measured / predicted) quantiles on the training rows (5 %, 95 %): widen the interval.
        self.residual_quantiles = (0.0, 0.0)
        self.metadata: dict[str, Any] = dict(metadata or {})
        # Hardware signatures of the training rows' GPUs, and the factor on the log correction for a
        # GPU outside them (chosen by leave-one-GPU-type-out CV on the training rows; 1 = no shrinkage).
        self.training_hardware: list[list[float]] = []
        self.unseen_hardware_scale = 1.0
        # log(measured / predicted) 5 % / 95 % quantiles of that CV at that scale: the interval on unseen GPUs.
        self.unseen_residual_quantiles = (0.0, 0.0)

    def knows(self, gpu) -> bool:
        """Whether ``gpu``'s datasheet matches a training GPU (True when the checkpoint records none)."""
        return not self.training_hardware or is_known_hardware(hardware_signature(gpu), self.training_hardware)

    def correction_scale(self, gpu) -> float:
        """1 for a GPU whose datasheet matches a training GPU, else ``unseen_hardware_scale``."""
        return 1.0 if self.knows(gpu) else self.unseen_hardware_scale

    def forward(self, x, edge_index, batch, u) -> torch.Tensor:
        """(members, graphs, 2) log corrections."""
        return torch.stack([m(x, edge_index, batch, u) for m in self.members])

    @torch.no_grad()
    def log_factors(self, graphs: Sequence[Data] | Batch) -> torch.Tensor:
        """(members, graphs, 2) log corrections of a list of step graphs (eval mode)."""
        self.eval()
        b = graphs if isinstance(graphs, Batch) else Batch.from_data_list(list(graphs))
        return self(b.x, b.edge_index, b.batch, b.u)

    def interval(self, member_logs: torch.Tensor, unseen_hardware: bool = False) -> tuple[float, float]:
        """Low/high log factors from the members' spread, widened by the training residual quantiles
        (on an unseen GPU: by the held-out-GPU residual quantiles of the CV that chose the scale)."""
        widen = self.unseen_residual_quantiles if unseen_hardware else self.residual_quantiles
        lo = float(torch.quantile(member_logs, 0.1)) + min(widen[0], 0.0)
        hi = float(torch.quantile(member_logs, 0.9)) + max(widen[1], 0.0)
        return lo, hi

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(tensors, str(path))
        sidecar = {"format": "llmco2-gnn-v1", "config": self.config,
                   "residual_quantiles": list(self.residual_quantiles), "metadata": self.metadata,
                   "training_hardware": self.training_hardware, "unseen_hardware_scale": self.unseen_hardware_scale,
                   "unseen_residual_quantiles": list(self.unseen_residual_quantiles)}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "GnnEnsemble":
        from safetensors.torch import load_file

        path = Path(path)
        sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if sidecar.get("format") != "llmco2-gnn-v1":
            raise ValueError(f"{path}: unknown checkpoint format {sidecar.get('format')!r}")
        config = sidecar["config"]
        if config["node_features"] != list(NODE_FEATURES) or config["graph_features"] != list(GRAPH_FEATURES):
            raise ValueError(f"{path}: checkpoint features differ from this operator_graph version; retrain")
        ensemble = cls(config["members"], config["hidden"], config["layers"], sidecar.get("metadata"))
        ensemble.load_state_dict(load_file(str(path)), strict=True)
        ensemble.residual_quantiles = tuple(float(v) for v in sidecar["residual_quantiles"])
        ensemble.training_hardware = [[float(v) for v in k] for k in sidecar.get("training_hardware", [])]
        scale = float(sidecar.get("unseen_hardware_scale", 1.0))
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"{path}: unseen_hardware_scale {scale} is outside [0, 1]")
        ensemble.unseen_hardware_scale = scale
        ensemble.unseen_residual_quantiles = tuple(float(v) for v in sidecar.get("unseen_residual_quantiles", (0.0, 0.0)))
        ensemble.eval()
        return ensemble


#: Relative tolerance within which two GPUs' datasheet features count as the same hardware.
HARDWARE_MATCH_RTOL = 0.02


def hardware_signature(gpu) -> list[float]:
    """Datasheet features that identify a GPU *design* for the seen/unseen test (not a model input):
    bf16 dense peak FLOP/s, memory bandwidth, memory bytes, TDP."""
    return [float(gpu.peak_flops("bf16")), float(gpu.memory_bandwidth_bytes_per_second), float(gpu.memory_bytes),
            float(gpu.tdp_watts)]


def is_known_hardware(signature: Sequence[float], known: Sequence[Sequence[float]]) -> bool:
    """True when ``signature`` matches one of ``known`` within ``HARDWARE_MATCH_RTOL`` on every feature."""
    return any(all(abs(a - b) <= HARDWARE_MATCH_RTOL * max(abs(a), abs(b), 1e-30) for a, b in zip(signature, k))
               for k in known)


#: Load-time grid the GNN is evaluated on to distil its correction into a closed form (request forecasts).
DISTIL_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DISTIL_PREFILL_TOKENS = tuple(2**k for k in range(4, 15))  # 16 .. 16384
DISTIL_DECODE_CONTEXTS = tuple(2**k for k in range(4, 17))  # 16 .. 65536


class DistilledCorrection(CorrectionTable):
    """The ensemble's mean log correction of ONE (model, hardware), tabulated for the fast path.

    At load time the GNN is evaluated once (one batched forward) on the static-batch grid above
    (prefill: batch x prompt tokens; decode: batch x context); a forecast interpolates the table
    bilinearly in (ln batch, ln tokens). Inputs outside the grid are clamped to its edge (no
    extrapolation). Evaluation is a few float operations, so a request forecast costs the
    analytic closed form plus a few µs. Its agreement with the full GNN is measured in
    ``benchmarks/gnn_forecast_speed.py``.
    """

    def __init__(self, ensemble: GnnEnsemble, builder: StepGraphBuilder, scale: float = 1.0) -> None:
        prefill = [StepShape.static_batch_prefill(b, t) for b in DISTIL_BATCH_SIZES for t in DISTIL_PREFILL_TOKENS]
        decode = [StepShape.static_batch_decode(b, t) for b in DISTIL_BATCH_SIZES for t in DISTIL_DECODE_CONTEXTS]
        logs = scale * ensemble.log_factors([builder.build(step)[0] for step in prefill + decode]).mean(0).double().numpy()
        shape = (len(DISTIL_BATCH_SIZES), len(DISTIL_PREFILL_TOKENS))
        super().__init__(
            [math.log(b) for b in DISTIL_BATCH_SIZES],
            ([math.log(t) for t in DISTIL_PREFILL_TOKENS], [math.log(t) for t in DISTIL_DECODE_CONTEXTS]),
            (
                logs[: len(prefill), 0].reshape(shape).tolist(),
                logs[len(prefill):, 1].reshape(len(DISTIL_BATCH_SIZES), len(DISTIL_DECODE_CONTEXTS)).tolist(),
            ),
        )


def default_checkpoint_path() -> Path:
    return Path(str(resources.files("llmco2_vllm").joinpath(DEFAULT_CHECKPOINT)))


class GnnPredictor:
    """``StepPredictor`` ("gnn"): analytic per-request weights, GNN-corrected phase totals.

    Never raises for a model it cannot handle: when the model cannot be expressed as an operator
    graph (``UnsupportedGraphError``), the checkpoint cannot be loaded, or building/evaluating a
    step's graph fails later, it predicts with the analytic model instead. Each predictor warns
    ONCE (``RuntimeWarning``; the first reason); ``fallback_reason`` keeps it and
    ``fallback_steps`` counts the steps predicted analytically after a per-step failure.
    """

    name = "gnn"

    def __init__(
        self,
        model: ModelDescription,
        hardware: Hardware,
        pipeline_parallel: int = 1,
        checkpoint: str | Path | GnnEnsemble | None = None,
        distil: bool = True,
    ) -> None:
        self.model, self.hardware, self.pipeline_parallel = model, hardware, pipeline_parallel
        self.analytic = AnalyticPredictor(model, hardware, pipeline_parallel)
        self.builder: StepGraphBuilder | None = None
        self.ensemble: GnnEnsemble | None = None
        self.distilled: DistilledCorrection | None = None
        # < 1 on a GPU the checkpoint was not trained on: the correction shrinks toward the analytic model.
        self.correction_scale = 1.0
        self.unseen_hardware = False
        self.fallback_reason = ""
        self.fallback_steps = 0
        try:
            self.builder = StepGraphBuilder(model, hardware, pipeline_parallel)
            if isinstance(checkpoint, GnnEnsemble):
                self.ensemble = checkpoint
            else:
                self.ensemble = GnnEnsemble.load(checkpoint or default_checkpoint_path())
            self.ensemble.eval()
            self.unseen_hardware = not self.ensemble.knows(hardware.gpu)
            self.correction_scale = self.ensemble.correction_scale(hardware.gpu)
            self.distilled = DistilledCorrection(self.ensemble, self.builder, self.correction_scale) if distil else None
        except Exception as error:  # noqa: BLE001 - any failure here means "use the analytic model"
            self.builder, self.ensemble, self.distilled = None, None, None
            self._warn_once(f"{type(error).__name__}: {error}")

    def _warn_once(self, reason: str) -> None:
        if self.fallback_reason:
            return
        self.fallback_reason = reason
        self.name = "analytic-fallback"  # a predictor named gnn is never silently something else
        warnings.warn(f"GnnPredictor ({self.model.name}): falling back to the analytic predictor: {reason}",
                      RuntimeWarning, stacklevel=3)

    @property
    def is_fallback(self) -> bool:
        return self.ensemble is None

    def static_batch(self, batch_size: int, prompt_tokens: int, output_tokens: int) -> tuple[float, float, float, float]:
        """The fast path for request forecasts: the analytic closed form x the distilled correction."""
        return corrected_static_batch(self.analytic.roofline, self.distilled, batch_size, prompt_tokens, output_tokens)

    def _member_logs(self, step: StepShape) -> tuple[torch.Tensor, StepPrediction]:
        assert self.builder is not None and self.ensemble is not None
        graph, analytic = self.builder.build(step)
        with torch.no_grad():
            logs = self.ensemble(graph.x, graph.edge_index, torch.zeros(graph.num_nodes, dtype=torch.long), graph.u)
        return logs[:, 0, :] * self.correction_scale, analytic

    def predict_step(self, step: StepShape) -> StepPrediction:
        return self.predict_step_interval(step)[0]

    def predict_step_interval(self, step: StepShape) -> tuple[StepPrediction, float, float]:
        """(prediction, low energy J, high energy J) of the step (whole step, both phases)."""
        if self.ensemble is None or step.total_prefill_tokens + step.total_decode_tokens == 0:
            pred = self.analytic.predict_step(step)
            return pred, pred.energy_j, pred.energy_j
        try:
            logs, a = self._member_logs(step)
        except Exception as error:  # noqa: BLE001 - a step the graph cannot take is predicted analytically
            self.fallback_steps += 1
            self._warn_once(f"step graph failed ({type(error).__name__}: {error})")
            pred = self.analytic.predict_step(step)
            return pred, pred.energy_j, pred.energy_j
        fp, fd = (math.exp(float(v)) for v in logs.mean(0))
        pred = StepPrediction(
            prefill_seconds=a.prefill_seconds * fp,
            decode_seconds=a.decode_seconds * fd,
            prefill_energy_j=a.prefill_energy_j * fp,
            decode_energy_j=a.decode_energy_j * fd,
            request_prefill_weights=a.request_prefill_weights,
            request_decode_weights=a.request_decode_weights,
        )
        # Interval on the step total: per member, total = analytic_p e^{o_p} + analytic_d e^{o_d}.
        totals = a.prefill_energy_j * torch.exp(logs[:, 0]) + a.decode_energy_j * torch.exp(logs[:, 1])
        lo, hi = self.ensemble.interval(torch.log(totals / max(pred.energy_j, 1e-30)), self.unseen_hardware)
        return pred, pred.energy_j * math.exp(lo), pred.energy_j * math.exp(hi)


__all__ = ["DistilledCorrection", "GnnEnsemble", "hardware_signature", "is_known_hardware", "GnnPredictor", "StepGNN", "default_checkpoint_path", "prediction_from_cost"]
