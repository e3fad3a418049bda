"""Writes the llmco2 Grafana dashboard (``llmco2-dashboard.json`` beside this file).

    python deploy/grafana/generate_dashboard.py          # rewrite the committed JSON
    python deploy/grafana/generate_dashboard.py --check  # exit 1 if the committed JSON is out of date

Generated rather than hand-edited so every panel has a unit and its queries use the template
variables the same way; ``tests/test_deploy.py`` runs every query below against a real Prometheus
scraping a real ``vllm serve`` with the plugin. Heavier expressions come from the recording rules in
``deploy/prometheus/rules/llmco2-recording-rules.yml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).with_name("llmco2-dashboard.json")
DASHBOARD_UID = "llmco2-vllm"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label matchers every per-replica query carries. The instance variable's "All" expands to the
# instances listed for the chosen models and GPUs, so the GPU choice narrows every panel.
REPLICA = 'model_name=~"$model_name", instance=~"$instance"'
RATE = "$__rate_interval"

# Grafana unit ids (custom "si:" units scale with SI prefixes: mgCO2e, kgCO2e, ...).
WATTS = "watt"
JOULES = "joule"
GRAMS = "si:gCO₂e"
GRAMS_PER_SECOND = "si:gCO₂e/s"
GRAMS_PER_KWH = "suffix: gCO₂e/kWh"
RATIO = "percentunit"
SECONDS = "s"
PER_SECOND = "ops"
REQUESTS_PER_SECOND = "reqps"
COUNT = "short"
FACTOR = "none"


@dataclass
class Query:
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    unit: str
    queries: list[Query]
    description: str
    kind: str = "timeseries"  # timeseries, stat, gauge, table
    width: int = 8
    height: int = 8
    stacked: bool = False
    thresholds: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def rows() -> list[Row]:
    source = 'source=~"$source"'
    return [
        Row("Energy and carbon", [
            Panel("Power by phase", WATTS, [
                Query(f'sum by (phase) (instance_model_phase_source:llmco2_energy_joules:rate5m{{{REPLICA}, {source}}})', "{{phase}}"),
            ], "Energy rate of the selected replicas' GPUs (J/s = W) for the chosen energy source, stacked by "
               "phase. idle is time with no engine step running.", stacked=True),
            Panel("Operational and embodied carbon rate by phase", GRAMS_PER_SECOND, [
                Query(f'sum by (phase) (instance_model_phase_source:llmco2_carbon_grams:rate5m{{{REPLICA}, {source}}})', "operational {{phase}}"),
                Query(f'sum by (phase) (rate(llmco2_embodied_carbon_grams_total{{{REPLICA}}}[{RATE}]))', "embodied {{phase}}"),
            ], "Operational carbon (energy x PUE x grid intensity) for the chosen energy source, and the GPUs' "
               "amortised embodied carbon, gCO2e per second, stacked by phase.", stacked=True),
            Panel("Power: predicted, calibrated, measured", WATTS, [
                Query(f'sum by (source) (instance_model_phase_source:llmco2_energy_joules:rate5m{{{REPLICA}}})', "{{source}}"),
            ], "All phases together, one line per source: predicted (analytic model), calibrated (online fit "
               "against NVML), measured (NVML; only on GPU hosts). The gap between lines is the prediction error."),
            Panel("Measured power per GPU", WATTS, [
                Query(f'sum by (instance, gpu_index, gpu_uuid) (rate(llmco2_gpu_energy_joules_total{{{REPLICA}}}[{RATE}]))',
                      "{{instance}} GPU {{gpu_index}} {{gpu_uuid}}"),
            ], "Each GPU's measured energy rate (NVML counter, J/s = W); labels join with DCGM and Kepler on gpu_uuid. "
               "Only on GPU hosts with NVML."),
            Panel("Energy per 1k output tokens", JOULES, [
                Query(f'1000 * sum by (source) (instance_model_phase_source:llmco2_energy_joules:rate5m{{{REPLICA}}})'
                      f' / on () group_left () sum(instance_model:vllm_generation_tokens:rate5m{{{REPLICA}}})', "{{source}}"),
            ], "Joules per 1000 generated tokens over the last 5 minutes, all phases (idle included) of the selected "
               "replicas divided by their generated tokens (vllm:generation_tokens_total). Empty while no tokens are generated."),
            Panel("Carbon per 1k output tokens", GRAMS, [
                Query(f'1000 * sum by (source) (instance_model_phase_source:llmco2_carbon_grams:rate5m{{{REPLICA}}})'
                      f' / on () group_left () sum(instance_model:vllm_generation_tokens:rate5m{{{REPLICA}}})', "operational {{source}}"),
                Query(f'1000 * sum(instance_model_phase:llmco2_embodied_carbon_grams:rate5m{{{REPLICA}}})'
                      f' / sum(instance_model:vllm_generation_tokens:rate5m{{{REPLICA}}})', "embodied"),
            ], "Operational (per energy source) and embodied gCO2e per 1000 generated tokens over the last 5 minutes, "
               "idle time included."),
            Panel("Energy per request", JOULES, [
                Query(f'sum(rate(llmco2_request_energy_joules_sum{{{REPLICA}}}[{RATE}]))'
                      f' / sum(rate(llmco2_request_energy_joules_count{{{REPLICA}}}[{RATE}]))', "mean (attributed)"),
                Query(f'histogram_quantile(0.9, sum by (le) (rate(llmco2_request_energy_joules_bucket{{{REPLICA}}}[{RATE}])))', "p90 (attributed)"),
            ], "Predicted energy attributed to each finished request (its share of every step it was in; idle "
               "time not included): mean and 90th percentile of requests finished in the interval."),
            Panel("Carbon per request", GRAMS, [
                Query(f'sum(rate(llmco2_request_carbon_grams_sum{{{REPLICA}}}[{RATE}]))'
                      f' / sum(rate(llmco2_request_carbon_grams_count{{{REPLICA}}}[{RATE}]))', "mean (attributed)"),
                Query(f'histogram_quantile(0.9, sum by (le) (rate(llmco2_request_carbon_grams_bucket{{{REPLICA}}}[{RATE}])))', "p90 (attributed)"),
                Query(f'sum by (source) (instance_model_phase_source:llmco2_carbon_grams:rate5m{{{REPLICA}}})'
                      f' / on () group_left () sum(instance_model:llmco2_requests:rate5m{{{REPLICA}}})', "all phases / requests, {{source}}"),
            ], "Operational gCO2e per finished request: attributed mean and p90, and the replicas' whole carbon "
               "rate (idle included) divided by their request rate over the last 5 minutes."),
            Panel("Tokens by phase", PER_SECOND, [
                Query(f'sum by (phase) (rate(llmco2_tokens_total{{{REPLICA}}}[{RATE}]))', "{{phase}}"),
            ], "Tokens per second the plugin accounted: prefill (computed prompt), decode (generated positions), "
               "cached (prompt tokens served from the prefix cache).", stacked=True),
            Panel("Requests finished", REQUESTS_PER_SECOND, [
                Query(f'sum by (instance) (instance_model:llmco2_requests:rate5m{{{REPLICA}}})', "{{instance}}"),
            ], "Finished requests with attributed energy per second, per replica (5-minute rate)."),
        ]),
        Row("Prediction and calibration", [
            Panel("Prediction error (MAPE vs NVML)", RATIO, [
                Query(f'max by (instance, correction) (llmco2_prediction_error_ratio{{{REPLICA}}})', "{{instance}} {{correction}}"),
            ], "Rolling mean absolute percentage error of window energy against NVML over the last 50 windows, before "
               "(raw) and after (calibrated) the online correction. Empty (NaN) on replicas without NVML. The alert "
               "Llmco2PredictionErrorHigh fires above 25 % (calibrated) for 15 minutes.",
                  thresholds=[(0, "green"), (0.25, "red")]),
            Panel("Calibration factor by phase", FACTOR, [
                Query(f'max by (instance, phase) (llmco2_calibration_scale{{{REPLICA}}})', "{{instance}} {{phase}}"),
            ], "Measured / predicted energy factor in force for prefill and decode (1 = the analytic model as is)."),
            Panel("Fitted model's terms in force (over shipped)", FACTOR, [
                Query(f'max by (instance, parameter) (llmco2_calibrated_term_ratio{{{REPLICA}}})', "{{instance}} {{parameter}}"),
                Query(f'max by (instance, signal, correction) (llmco2_term_calibration_error_ratio{{{REPLICA}}})',
                      "{{instance}} {{signal}} error {{correction}}"),
            ], "Each term of the fitted time and power model in force over its shipped value (offline `llmco2 calibrate` "
               "and online learning from NVML windows; 1 = as shipped), and the one-step-ahead error of window energy "
               "(and step time on GPU hosts) with the shipped and the learned terms. The errors are NaN without NVML."),
            Panel("Calibrated idle power", WATTS, [
                Query(f'max by (instance) (llmco2_calibration_idle_watts{{{REPLICA}}})', "{{instance}}"),
            ], "Idle power of each replica's GPUs in force (prior: 15 % of TDP per GPU until NVML windows are learned)."),
            Panel("Calibration windows learned", COUNT, [
                Query(f'max by (instance) (llmco2_calibration_windows{{{REPLICA}}})', "{{instance}}"),
            ], "Measurement windows the online calibration has learned (kept across restarts with "
               "LLMCO2_CALIBRATION_FILE).", kind="stat"),
            Panel("Energy measured by NVML", COUNT, [
                Query(f'min by (instance) (llmco2_energy_measurement_available{{{REPLICA}}})', "{{instance}}"),
            ], "1 where the replica's GPU energy is metered through NVML, 0 where it is only predicted.",
                  kind="stat", thresholds=[(0, "orange"), (1, "green")]),
            Panel("Hardware and predictor", COUNT, [
                Query(f'max by (instance, gpu, num_gpus, tensor_parallel, hardware_source, predictor) '
                      f'(llmco2_target_info{{{REPLICA}, gpu=~"$gpu"}})', "{{instance}} {{gpu}}"),
            ], "What the numbers are for: GPU, number of GPUs, tensor parallelism, where the GPU came from (nvml, "
               "or configured when none was detected) and the predictor.", kind="table"),
        ]),
        Row("Grid carbon intensity", [
            Panel("Grid intensity in use", GRAMS_PER_KWH, [
                Query(f'max by (instance, region, kind) (llmco2_grid_intensity_grams_per_kwh{{{REPLICA}}})', "{{instance}} {{region}} {{kind}}"),
            ], "Grid carbon intensity each replica multiplies its energy by, gCO2e/kWh, with its region and kind."),
            Panel("Intensity age", SECONDS, [
                Query(f'max by (instance) (llmco2_grid_intensity_age_seconds{{{REPLICA}}})', "{{instance}}"),
            ], "Age of the intensity value in use. The alert Llmco2GridIntensityStale fires above 2 hours for 10 minutes.",
                  thresholds=[(0, "green"), (7200, "red")]),
            Panel("Intensity provider errors", PER_SECOND, [
                Query(f'sum by (instance) (rate(llmco2_grid_intensity_errors_total{{{REPLICA}}}[{RATE}]))', "{{instance}}"),
            ], "Failed fetches from the carbon-intensity provider per second; the last good value stays in use."),
            Panel("PUE in use", FACTOR, [
                Query(f'max by (instance) (llmco2_pue{{{REPLICA}}})', "{{instance}}"),
            ], "Data-centre power usage effectiveness each replica applies (1.0 = GPU-only boundary).", kind="stat"),
        ]),
        Row("Admission control", [
            Panel("Admission decisions", REQUESTS_PER_SECOND, [
                Query(f'sum by (decision, policy) (rate(llmco2_admission_decisions_total{{{REPLICA}}}[{RATE}]))', "{{decision}} ({{policy}})"),
            ], "Requests per second admitted, rejected or deferred, by the policy that decided (none, cap, budget, "
               "intensity; error when admission control failed and let the request through).", stacked=True),
            Panel("Requests waiting for admission", COUNT, [
                Query(f'sum by (instance) (llmco2_admission_waiting_requests{{{REPLICA}}})', "{{instance}}"),
            ], "Deferred requests waiting to be admitted, per replica."),
            Panel("Carbon budget", GRAMS, [
                Query(f'max by (instance) (llmco2_carbon_budget_spent_grams{{{REPLICA}}})', "spent {{instance}}"),
                Query(f'max by (instance) (llmco2_carbon_budget_grams{{{REPLICA}}})', "budget {{instance}}"),
            ], "Carbon spent in the current budget window against the configured budget "
               "(LLMCO2_ADMISSION_BUDGET_GRAMS), per replica."),
            Panel("Carbon budget used", RATIO, [
                Query(f'max by (instance) (llmco2_carbon_budget_spent_grams{{{REPLICA}}}'
                      f' / (llmco2_carbon_budget_grams{{{REPLICA}}} > 0))', "{{instance}}"),
            ], "Share of the budget spent. The alert Llmco2CarbonBudgetNearlySpent fires above 90 %.",
                  kind="gauge", thresholds=[(0, "green"), (0.75, "orange"), (0.9, "red")]),
            Panel("Admission errors", PER_SECOND, [
                Query(f'sum by (instance) (rate(llmco2_admission_errors_total{{{REPLICA}}}[{RATE}]))', "{{instance}}"),
            ], "Failures inside admission control per second (requests are let through, policy=\"error\")."),
        ]),
        Row("Plugin health", [
            Panel("Plugin errors by stage", PER_SECOND, [
                Query(f'sum by (stage) (rate(llmco2_plugin_errors_total{{{REPLICA}}}[{RATE}]))', "{{stage}}"),
            ], "Failures caught inside the plugin per second, by pipeline stage. vLLM keeps serving; the first "
               "failure of each stage is in the vLLM log.", stacked=True),
            Panel("Dropped steps and evicted requests", PER_SECOND, [
                Query(f'sum by (instance) (rate(llmco2_dropped_steps_total{{{REPLICA}}}[{RATE}]))', "dropped steps {{instance}}"),
                Query(f'sum by (instance) (rate(llmco2_evicted_requests_total{{{REPLICA}}}[{RATE}]))', "evicted requests {{instance}}"),
            ], "Steps not accounted because the capture queue was full (raise LLMCO2_QUEUE_CAPACITY or give the host "
               "more CPU), and running requests dropped from the ledger (LLMCO2_MAX_TRACKED_REQUESTS)."),
            Panel("Capture lag", SECONDS, [
                Query(f'max by (instance) (llmco2_capture_lag_seconds{{{REPLICA}}})', "{{instance}}"),
            ], "Age of the oldest step the worker thread processed in its last pass: how late the metrics are.",
                  thresholds=[(0, "green"), (30, "red")]),
            Panel("Capture queue depth", COUNT, [
                Query(f'max by (instance) (llmco2_queue_depth{{{REPLICA}}})', "{{instance}}"),
            ], "Captured steps waiting for the worker thread (steps are dropped at LLMCO2_QUEUE_CAPACITY)."),
        ]),
        # Fleet rows use the fleet recording rules: summed across replicas, by model and grid region.
        Row("Fleet (all replicas of the selected models)", [
            Panel("Carbon rate by model and region", GRAMS_PER_SECOND, [
                Query('sum by (model_name, region) (model_region_source:llmco2_carbon_grams:rate5m{model_name=~"$model_name", source=~"$source"})',
                      "operational {{model_name}} {{region}}"),
                Query('sum by (model_name, region) (model_region:llmco2_embodied_carbon_grams:rate5m{model_name=~"$model_name"})',
                      "embodied {{model_name}} {{region}}"),
            ], "Carbon rate of every replica of a model summed by grid region (the region each replica's plugin is "
               "configured with), for the chosen energy source.", stacked=True),
            Panel("Power by model and region", WATTS, [
                Query('sum by (model_name, region) (model_region_source:llmco2_energy_joules:rate5m{model_name=~"$model_name", source=~"$source"})',
                      "{{model_name}} {{region}}"),
            ], "GPU power of every replica of a model summed by grid region, for the chosen energy source.", stacked=True),
            Panel("Fleet energy per 1k output tokens", JOULES, [
                Query('1000 * model_source:llmco2_energy_joules_per_output_token:ratio_rate5m{model_name=~"$model_name", source=~"$source"}',
                      "{{model_name}}"),
            ], "Energy of all replicas of a model over their generated tokens (ratio of sums, idle included)."),
            Panel("Fleet carbon per request", GRAMS, [
                Query('model_source:llmco2_carbon_grams_per_request:ratio_rate5m{model_name=~"$model_name", source=~"$source"}',
                      "{{model_name}}"),
            ], "Operational carbon of all replicas of a model over their finished requests (ratio of sums, idle included)."),
            Panel("Replicas reporting", COUNT, [
                Query('model:llmco2_replicas:count{model_name=~"$model_name"}', "{{model_name}}"),
            ], "Scrape targets exporting llmco2 metrics, per model.", kind="stat"),
        ]),
    ]  # fmt: skip


def variables() -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"},
            "definition": query,
            "refresh": 2,  # on time range change: replicas come and go
            "multi": True,
            "includeAll": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        query_variable("model_name", "Model", "label_values(llmco2_target_info, model_name)"),
        query_variable("gpu", "GPU", 'label_values(llmco2_target_info{model_name=~"$model_name"}, gpu)'),
        query_variable("instance", "Instance", 'label_values(llmco2_target_info{model_name=~"$model_name", gpu=~"$gpu"}, instance)'),
        {
            "name": "source",
            "label": "Energy source",
            "type": "custom",
            "query": "calibrated,predicted,measured",
            "options": [
                {"selected": value == "calibrated", "text": value, "value": value}
                for value in ("calibrated", "predicted", "measured")
            ],
            "current": {"selected": True, "text": "calibrated", "value": "calibrated"},
            "multi": False,
            "includeAll": False,
            "description": "measured exists only on GPU hosts with NVML; calibrated equals predicted x the online correction.",
        },
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": None if i == 0 else value} for i, (value, color) in enumerate(panel.thresholds)],
        }
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if panel.thresholds else "off"},
        }
    options: dict[str, Any] = {}
    if panel.kind == "timeseries":
        options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]},
                   "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    elif panel.kind in ("stat", "gauge"):
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend,
            "range": panel.kind != "table",
            "instant": panel.kind == "table",
        }
        if panel.kind == "table":
            target["format"] = "table"
        targets.append(target)
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        result["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    return result


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in rows():
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + row_height
                row_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": DASHBOARD_UID,
        "title": "LLM energy and carbon (llmco2-vllm)",
        "description": "Energy, carbon, prediction quality, grid intensity, admission control and plugin health of "
        "vLLM servers running the llmco2-vllm plugin. Generated by deploy/grafana/generate_dashboard.py.",
        "tags": ["vllm", "llmco2", "energy", "carbon"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the generator")
    arguments = parser.parse_args()
    text = render()
    if arguments.check:
        if DASHBOARD_PATH.read_text() != text:
            print(f"{DASHBOARD_PATH} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.write_text(text)
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
