"""deploy/: the Grafana dashboard, Prometheus rules and manifests, proven against real parts.

A real ``vllm serve`` with the plugin on 127.0.0.1 is scraped every second by a real Prometheus
(Debian's ``prometheus`` binary) running deploy/prometheus/prometheus.yml with only the target,
intervals and rule paths changed. After traffic, every dashboard query (template variables resolved
through Prometheus' label API, as Grafana does) and every recording rule runs through the HTTP API and
must return finite data carrying the labels its legend or rule name promises. Static checks: promtool
check config / check rules / test rules, generated files up to date, dashboard metric names against
what the plugin really exports, docker-compose and Kubernetes files parse and point at each other.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmco2_vllm.dev.local_server import LocalVllmServer, free_port
from llmco2_vllm.dev.prometheus_text import parse_metrics
from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD_PATH = DEPLOY / "grafana" / "llmco2-dashboard.json"
PROMETHEUS_CONFIG_PATH = DEPLOY / "prometheus" / "prometheus.yml"
RULE_PATHS = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULES_TEST_PATH = DEPLOY / "prometheus" / "tests" / "llmco2-rules-test.yml"
KUBERNETES = DEPLOY / "kubernetes"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
MISSING = "Debian's prometheus package is not installed (.ci/run installs it)"
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus binary missing: {MISSING}")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool missing: {MISSING}")
# NaN is the documented value until NVML windows are measured; this machine has no GPU.
NAN_WITHOUT_NVML = {"llmco2_prediction_error_ratio", "llmco2_term_calibration_error_ratio"}
# Exported only where NVML measures GPUs (absent here); tests/test_measured_pipeline.py checks the dashboard's name is exported there.
ONLY_WITH_NVML = {"llmco2_gpu_energy_joules_total"}
# Grafana's $__rate_interval; long enough that the traffic below is still inside it when queried.
RATE_INTERVAL = "2m"
# A recording rule's level names the labels it keeps (Prometheus' level:metric:operations convention).
LEVEL_LABELS = {
    "instance": ("job", "instance"), "model": ("model_name",), "phase": ("phase",), "source": ("source",), "region": ("region",)
}  # fmt: skip
METRIC_NAME = re.compile(r"(?<![\w:$])([a-zA-Z_][a-zA-Z0-9_]*(?::[a-zA-Z0-9_]+)+|llmco2_[a-zA-Z0-9_]+)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(test id, target) for every query of every panel."""
    return [
        (f"{panel['title']} [{target['refId']}]", target)
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def recording_rules() -> list[dict[str, Any]]:
    rules_file = DEPLOY / "prometheus" / "rules" / "llmco2-recording-rules.yml"
    return [rule for group in yaml.safe_load(rules_file.read_text())["groups"] for rule in group["rules"]]


def all_rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_PATHS for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# -- generated files --------------------------------------------------------------------------------


def test_dashboard_json_is_the_generators_output():
    generator = load_module(DEPLOY / "grafana" / "generate_dashboard.py")
    assert DASHBOARD_PATH.read_text() == generator.render(), "run: python deploy/grafana/generate_dashboard.py"


def test_prometheusrule_is_the_generators_output():
    generator = load_module(KUBERNETES / "generate_prometheusrule.py")
    assert (KUBERNETES / "llmco2-prometheusrule.yaml").read_text() == generator.render(), (
        "run: python deploy/kubernetes/generate_prometheusrule.py"
    )
    resource = yaml.safe_load((KUBERNETES / "llmco2-prometheusrule.yaml").read_text())
    assert [rule for group in resource["spec"]["groups"] for rule in group["rules"]] == all_rules()


def test_every_panel_has_a_unit_queries_and_the_variables():
    board = dashboard()
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "model_name", "instance", "gpu", "source"} <= variables
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'model_name=~"$model_name"' in target["expr"], (panel["title"], target["expr"])
    # The GPU variable narrows the instance variable, whose "All" lists only those instances.
    instance = next(variable for variable in board["templating"]["list"] if variable["name"] == "instance")
    assert 'gpu=~"$gpu"' in instance["definition"] and "allValue" not in instance


# -- promtool ---------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_config(tmp_path):
    result = promtool("check", "config", str(PROMETHEUS_CONFIG_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    # The same configuration with the rules at their paths here, so check config loads them too.
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config_for("127.0.0.1:8000")))
    result = promtool("check", "config", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") >= 1 + len(RULE_PATHS), result.stdout


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", *map(str, RULE_PATHS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules():
    result = promtool("test", "rules", str(RULES_TEST_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST_PATH.read_text()))
    assert tested == {rule["alert"] for rule in all_rules() if "alert" in rule}, "every alert needs a promtool test"


# -- manifests --------------------------------------------------------------------------------------


def test_docker_compose_points_at_the_right_files_and_ports():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"vllm", "prometheus", "grafana"}
    vllm = services["vllm"]
    dockerfile = (DEPLOY / vllm["build"]["context"] / vllm["build"]["dockerfile"]).resolve()
    assert dockerfile.is_file()
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", dockerfile.read_text(), re.MULTILINE)
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v0\.32\.\d+$", dockerfile.read_text(), re.MULTILINE)
    assert (dockerfile.parent / "Dockerfile.dockerignore").is_file(), "keeps .venv/ out of the build context"
    port = vllm["command"][vllm["command"].index("--port") + 1]
    assert f"{port}:{port}" in vllm["ports"]
    assert "llmco2" in vllm["environment"]["VLLM_PLUGINS"].split(",")
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
                mounts[target] = DEPLOY / source
    # Prometheus scrapes the vLLM service on its port and loads the rules where they are mounted.
    config = yaml.safe_load(PROMETHEUS_CONFIG_PATH.read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG_PATH
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [f"vllm:{port}"]
    rule_glob = config["rule_files"][0]
    assert sorted(mounts[str(Path(rule_glob).parent)].glob(Path(rule_glob).name)) == RULE_PATHS
    # Grafana: datasource at the Prometheus service, dashboard where the provider looks.
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    provider = yaml.safe_load((provisioning / "dashboards" / "llmco2.yml").read_text())["providers"][0]
    dashboard_mount = next(target for target, source in mounts.items() if source == DASHBOARD_PATH)
    assert str(Path(dashboard_mount).parent) == provider["options"]["path"]


def test_kubernetes_manifests_fit_together():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    resources = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            resources[document["kind"]] = document
    assert set(resources) == {"Namespace", "Deployment", "Service", "PodMonitor", "PrometheusRule"}
    namespace = resources["Namespace"]["metadata"]["name"]
    assert all(r["metadata"].get("namespace", namespace) == namespace for r in resources.values())
    deployment = resources["Deployment"]
    assert deployment["spec"]["replicas"] > 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert str(ports["http"]) == container["args"][container["args"].index("--port") + 1]
    environment = {item["name"]: item.get("value") for item in container["env"]}
    assert "llmco2" in environment["VLLM_PLUGINS"].split(",") and environment["LLMCO2_REGION"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The PodMonitor scrapes every replica's named port; the Service sends traffic to the same pods.
    pod_monitor = resources["PodMonitor"]["spec"]
    assert pod_monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_monitor["podMetricsEndpoints"][0]["port"] in ports
    assert pod_monitor["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert resources["Service"]["spec"]["selector"].items() <= pod_labels.items()
    # No target label may be called like a label the plugin exports (Prometheus would rename it exported_*).
    relabelled = {rule.get("targetLabel") for rule in pod_monitor["podMetricsEndpoints"][0].get("relabelings", [])}
    assert not relabelled & {"region", "model_name", "engine", "phase", "source", "gpu"}


# -- live: a real vllm serve scraped by a real Prometheus --------------------------------------------


def prometheus_config_for(target: str, scrape_interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the target, the intervals and the rule paths of this machine."""
    config = yaml.safe_load(PROMETHEUS_CONFIG_PATH.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str(path) for path in RULE_PATHS]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    return config




class LocalPrometheus:
    """The real prometheus binary on 127.0.0.1 with a temporary config and storage."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "LocalPrometheus":
        self._log = open(self.directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.directory / 'prometheus.yml'}", f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.wait_until(lambda: self.get("/-/ready", raw=True) is not None, 60, "ready")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self._log.close()

    def get(self, path: str, raw: bool = False, **params: str) -> Any:
        url = self.base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
        except (urllib.error.URLError, ConnectionError, OSError):
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> tuple[list[dict[str, Any]] | None, str]:
        """(result vector, error): the instant value of ``expr`` now."""
        url = self.base_url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())["data"]["result"], ""
        except urllib.error.HTTPError as error:  # 400/422: the expression does not parse or evaluate
            return None, error.read().decode()

    def label_values(self, label: str, selector: str) -> list[str]:
        answer = self.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        return answer["data"] if answer else []

    def wait_until(self, condition, timeout_seconds: float, what: str) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            if time.monotonic() > deadline:
                log = (self.directory / "prometheus.log").read_text()[-3000:]
                raise TimeoutError(f"Prometheus not {what} after {timeout_seconds} s; log: {log}")
            time.sleep(0.5)


def resolve_variables(prometheus: LocalPrometheus) -> dict[str, str]:
    """Each template variable's value as Grafana would send it: query variables run through the label API,
    multi-value "All" as a regex alternation; custom variables take their current value."""
    values: dict[str, str] = {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(substitute(variable["definition"], values))
            assert match, variable["definition"]
            found = prometheus.label_values(match.group(2), match.group(1))
            # As Grafana does: regex-escaped, then backslashes doubled for the PromQL string literal.
            alternatives = "|".join(re.escape(value).replace("\\", "\\\\") for value in found)
            values[variable["name"]] = f"({alternatives})" if found else ""
        elif variable["type"] == "custom":
            values[variable["name"]] = variable["current"]["value"]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("$" + name, value)
    return expr


def send_traffic(server: LocalVllmServer) -> int:
    jobs = [(list(range(1, 8 + 7 * i)), 4 + 2 * i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: server.complete(*job), jobs))
    return len(results)


def sample_is_finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """vLLM with the plugin, Prometheus scraping it, traffic sent, every query evaluated once data is in."""
    directory = tmp_path_factory.mktemp("deploy")
    # VLLM_PLUGINS: vLLM adds the plugin's routes (admission control) only when named there; the
    # budget makes the carbon-budget series exist.
    env = {"VLLM_PLUGINS": "llmco2", "LLMCO2_ADMISSION_BUDGET_GRAMS": "1000", "OMP_NUM_THREADS": "1"}
    server = LocalVllmServer(tiny_model_dir, ["--max-num-seqs", "8"], env=env, log_path=directory / "serve.log")
    prometheus = None
    try:
        server.start()
        target = f"127.0.0.1:{server.port}"
        prometheus = LocalPrometheus(prometheus_config_for(target), directory).start()

        def target_up() -> bool:
            result, _ = prometheus.query(f'up{{instance="{target}"}} == 1 and on (instance) llmco2_target_info')
            return bool(result)

        prometheus.wait_until(target_up, 60, "scraping the vLLM server")
        # Traffic after the first scrapes, so the rates see the counters grow.
        requests = send_traffic(server)

        def traffic_recorded() -> bool:
            per_token = "instance_model_source:llmco2_energy_joules_per_output_token:ratio_rate5m"
            result, _ = prometheus.query(f"sum(llmco2_requests_total) >= {requests} and on () {per_token}")
            return bool(result)

        prometheus.wait_until(traffic_recorded, 60, "showing the traffic")
        time.sleep(3)  # a few more rule evaluations for the fleet group
        variables = resolve_variables(prometheus)
        queries = {key: substitute(target["expr"], variables) for key, target in dashboard_targets()}
        queries.update({rule["record"]: rule["record"] for rule in recording_rules()})
        results: dict[str, tuple[list[dict[str, Any]] | None, str]] = {}
        deadline = time.monotonic() + 15  # late series (engine snapshot flushes, rule groups) get a little longer
        while True:
            for key, expr in queries.items():
                if key not in results or not results[key][0]:
                    results[key] = prometheus.query(expr)
            if all(result for result, _ in results.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        rules = prometheus.get("/api/v1/rules")["data"]["groups"]
        yield {"server": server, "prometheus": prometheus, "variables": variables, "queries": queries,
               "results": results, "rules": rules, "metrics_text": server.metrics_text()}  # fmt: skip
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def exported_metric_names(metrics_text: str) -> set[str]:
    return {name for name, _ in parse_metrics(metrics_text)}


def explain_missing(expr: str, metrics_text: str) -> str:
    records = {rule["record"] for rule in recording_rules()}
    missing = metric_names(expr) - records - exported_metric_names(metrics_text)
    return f" (the server does not export {sorted(missing)})" if missing else ""


@pytest.mark.server
@needs_prometheus
def test_variables_resolve_to_the_servers_labels(stack):
    variables = stack["variables"]
    assert variables["model_name"] == r"(tiny\\-llama)"
    assert variables["gpu"] == r"(H100\\-SXM5\\-80GB)"  # the configured target: no GPU here
    assert variables["instance"] == rf"(127\\.0\\.0\\.1:{stack['server'].port})"
    assert variables["source"] == "calibrated"


@pytest.mark.server
@needs_prometheus
@pytest.mark.parametrize("key", [key for key, _ in dashboard_targets()])
def test_dashboard_query_returns_data(stack, key):
    target = dict(dashboard_targets())[key]
    expr = stack["queries"][key]
    result, error = stack["results"][key]
    assert result is not None, f"{expr}: {error}"
    if metric_names(expr) & ONLY_WITH_NVML:
        assert result == [], f"per-GPU series without NVML: {result}"
        return
    assert result, f"no data: {expr}" + explain_missing(expr, stack["metrics_text"])
    for label in LEGEND_LABEL.findall(target["legendFormat"]):
        assert all(label in sample["metric"] for sample in result), f"legend label {label} missing: {result}"
    if not metric_names(expr) & NAN_WITHOUT_NVML:
        assert any(sample_is_finite(sample) for sample in result), f"only NaN/Inf: {expr} -> {result}"


@pytest.mark.server
@needs_prometheus
@pytest.mark.parametrize("record", [rule["record"] for rule in recording_rules()])
def test_recording_rule_returns_data(stack, record):
    result, error = stack["results"][record]
    rule = next(rule for rule in recording_rules() if rule["record"] == record)
    assert result, f"no data for {record} = {rule['expr']}" + explain_missing(rule["expr"], stack["metrics_text"])
    expected = {label for level in record.split(":")[0].split("_") for label in LEVEL_LABELS[level]}
    for sample in result:
        assert set(sample["metric"]) - {"__name__"} == expected, sample["metric"]
        assert sample["metric"]["model_name"] == "tiny-llama"
    assert all(sample_is_finite(sample) for sample in result), result
    if "region" in expected:
        assert {sample["metric"]["region"] for sample in result} == {"WORLD"}  # LLMCO2_REGION's default


@pytest.mark.server
@needs_prometheus
def test_every_rule_evaluates_without_error(stack):
    loaded = [rule for group in stack["rules"] for rule in group["rules"]]
    assert {rule["name"] for rule in loaded} == {rule.get("record") or rule["alert"] for rule in all_rules()}
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # Nothing is wrong with this server, so no alert may be pending or firing.
    assert [rule["name"] for rule in loaded if rule.get("state") not in (None, "inactive")] == []


@pytest.mark.server
@needs_prometheus
def test_dashboard_and_rules_use_only_exported_metrics(stack):
    exported = exported_metric_names(stack["metrics_text"])
    records = {rule["record"] for rule in recording_rules()}
    expressions = [target["expr"] for _, target in dashboard_targets()]
    expressions += [variable["definition"] for variable in dashboard()["templating"]["list"] if variable["type"] == "query"]
    expressions += [rule["expr"] for rule in all_rules()]
    used = set().union(*(metric_names(expr) for expr in expressions))
    unknown = sorted(used - exported - records - ONLY_WITH_NVML)
    assert not unknown, f"queries on metrics the server does not export: {unknown}"
