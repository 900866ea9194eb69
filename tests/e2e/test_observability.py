"""What an operator sees, end to end: `meshserve up --trace-ui` (a real Arize Phoenix, its
environment built on first use), Phoenix's REST API, and a real Prometheus (Debian's binary,
scripts/test-tools.sh) scraping the mesh with the config `meshserve up` writes.

A streamed request's trace id from the response header leads to its router, agent and engine
spans (status OK); a failed request's spans are ERROR; a cold request's trace holds its decision
and load, whose ids lead to the scheduler round and the agent's load; idle scheduler rounds export
nothing; Prometheus reads TTFT per model and GPU memory per device, and a TTFT exemplar leads to
its trace in Phoenix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import free_port
from tests.waiting import eventually

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="Phoenix"),
    pytest.mark.timeout(900),  # the first test also builds Phoenix's environment (pip, ~1 min)
]
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "tests" / "standins"
GIB = 2**30


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    out: Path
    router: str
    ui: str
    env: dict[str, str]

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.data_dir / "state.json").read_text()))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "meshserve", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def spans(self, **query: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"limit": "1000", **query})
        return list(get_json(f"{self.ui}/v1/projects/meshserve/spans?{q}")["data"])

    def generate(self, model: str, prompt: str = "Once upon a time") -> str:
        """`meshserve generate` as a person runs it; returns the trace id it printed."""
        # Greedy: the random tiny model may sample its end-of-text token early (CI once saw 5
        # tokens of 8); greedy decoding of the fixed-seed demo model always gives all 8.
        done = self.cli(
            "generate", model, prompt, "--max-tokens", "8", "--temperature", "0", "--timeout", "90"
        )
        found = re.search(r"trace ([0-9a-f]{32}) (\S+)", done.stderr)
        assert found, done.stderr
        trace_id, link = found.groups()
        assert link == f"{self.ui}/redirects/traces/{trace_id}"  # the UI's page for it
        return trace_id


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data = tmp_path_factory.mktemp("observe")
    router, ui_port = free_port(), free_port()
    out = data.parent / "observe-up.out"
    env = {**os.environ, "MESHSERVE_HOME": str(data)}  # `meshserve generate` finds this mesh
    command = [
        sys.executable, "-m", "meshserve", "up", "--agents", "1", "--port", str(router),
        "--http-port", "0", "--data-dir", str(data), "--max-tokens", "4", "--trace-ui",
        "--trace-ui-port", str(ui_port), "--trace-otlp-port", str(free_port()),
    ]  # fmt: skip
    with open(out, "wb") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    u = Up(proc, data, out, f"127.0.0.1:{router}", f"http://127.0.0.1:{ui_port}", env)
    # First use builds Phoenix's environment (about a minute), then the mesh starts.
    deadline = time.monotonic() + 600
    while "Ctrl-C stops the mesh" not in u.output():
        assert proc.poll() is None, f"meshserve up exited:\n{u.output()}"
        assert time.monotonic() < deadline, u.output()
        time.sleep(0.2)
    assert f"trace UI {u.ui}" in u.output()
    yield u
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 128 + signal.SIGINT, u.output()


async def test_a_streamed_request_is_one_tree_in_the_trace_ui(up: Up) -> None:
    trace_id = up.generate("demo")

    def tree() -> dict[str, dict[str, Any]] | None:
        spans = up.spans(trace_id=trace_id)
        by_name: dict[str, dict[str, Any]] = {}
        for s in spans:
            if s["name"] == "meshserve.v1.Inference/Generate":
                by_name["router" if s["parent_id"] is None else "agent"] = s
            else:
                by_name[s["name"]] = s
        wanted = {"router", "router.pick", "router.attempt", "agent", "engine.generate"}
        return by_name if wanted <= set(by_name) else None

    spans = await eventually(tree, 30, "the request's spans in Phoenix")
    for name in ("router", "agent", "engine.generate"):
        assert spans[name]["status_code"] == "OK", spans[name]
    assert spans["agent"]["parent_id"] == spans["router.attempt"]["context"]["span_id"]
    assert spans["engine.generate"]["parent_id"] == spans["agent"]["context"]["span_id"]
    router = spans["router"]["attributes"]
    assert router["gen_ai.request.model"] == "demo"
    assert router["gen_ai.usage.output_tokens"] == 8
    assert "meshserve.ttft_s" in router
    # No prompt or completion text anywhere in the trace (only counts and timings).
    assert "upon a time" not in json.dumps(list(spans.values()))


async def test_a_failed_request_is_an_error_in_the_trace_ui(up: Up) -> None:
    done = up.cli("generate", "no-such-model", "hi", check=False)
    assert done.returncode != 0 and "NOT_FOUND" in done.stderr
    # A failure has a trace id too (traceresponse in the trailers), printed with its page.
    found = re.search(r"trace ([0-9a-f]{32}) (\S+)", done.stderr)
    assert found, done.stderr
    trace_id, link = found.groups()
    assert link == f"{up.ui}/redirects/traces/{trace_id}"

    def failed() -> list[dict[str, Any]]:
        return [
            s
            for s in up.spans(trace_id=trace_id)
            if s["name"] == "meshserve.v1.Inference/Generate" and s["status_code"] == "ERROR"
        ]

    [span] = await eventually(failed, 30, "the failed request's span, ERROR")
    assert span["status_message"].startswith("NOT_FOUND")
    assert "no-such-model" in span["status_message"]
    assert span["attributes"]["rpc.grpc.status_code"] == 5


async def test_a_cold_request_trace_holds_its_decision_and_load(up: Up) -> None:
    source = up.data_dir / "models" / "demo"
    spec = up.data_dir / "lazy.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"name": "lazy", "source": str(source), "max_model_len": 2048, "min_replicas": 0}
        )
    )
    up.cli("model", "apply", str(spec), "--etcd", up.state()["etcd"])
    trace_id = up.generate("lazy")

    def explained() -> dict[str, dict[str, Any]] | None:
        found = {s["name"]: s for s in up.spans(trace_id=trace_id)}
        names = {"router.pick", "cold_start.decision", "cold_start.load"}
        return found if names <= set(found) else None

    spans = await eventually(explained, 30, "the cold request's decision and load spans")
    pick = spans["router.pick"]
    assert pick["attributes"]["meshserve.cold_start"] is True
    for name in ("cold_start.decision", "cold_start.load"):
        assert spans[name]["parent_id"] == pick["context"]["span_id"]
    decision = spans["cold_start.decision"]["attributes"]
    load = spans["cold_start.load"]["attributes"]
    assert decision["meshserve.placement.reason"] and decision["meshserve.node"] == "agent-0"
    assert load["meshserve.load.from"] == "source" and load["meshserve.load.bytes"] > 0

    # Their ids lead to the scheduler's round (which says what it placed) and the agent's load.
    def remote(attributes: dict[str, Any]) -> dict[str, Any] | None:
        span_id = attributes["meshserve.linked.span_id"]
        for s in up.spans(trace_id=attributes["meshserve.linked.trace_id"]):
            if s["context"]["span_id"] == span_id:
                return s
        return None

    round_ = await eventually(lambda: remote(decision), 30, "the placing round in Phoenix")
    assert round_["name"] == "scheduler.round"
    assert any(
        e["name"] == "place" and e["attributes"].get("gen_ai.request.model") == "lazy"
        for e in round_["events"]
    ), round_["events"]
    agent_load = await eventually(lambda: remote(load), 30, "the agent's load in Phoenix")
    assert agent_load["name"] == "model.load"
    assert agent_load["attributes"]["meshserve.load_seconds"] == pytest.approx(
        load["meshserve.load.seconds"], rel=0.01
    )


async def test_idle_scheduler_rounds_export_no_spans(up: Up) -> None:
    scheduler = prometheus_targets(up)["scheduler-0"]

    def idle_rounds() -> float:
        with urllib.request.urlopen(f"http://{scheduler}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("meshserve_scheduler_idle_rounds_total "):
                    return float(line.split()[1])
        raise AssertionError("no idle-round counter")

    since_ns, before = time.time_ns(), idle_rounds()
    await eventually(lambda: idle_rounds() >= before + 5, 60, "five idle rounds")
    # Then a round that writes (a new model to place): the scheduler exports spans in order, so
    # once its span is in Phoenix, any span of the idle rounds before it would be there too.
    spec = up.data_dir / "marker.yaml"
    source = up.data_dir / "models" / "demo"
    spec.write_text(
        yaml.safe_dump(
            {"name": "marker", "source": str(source), "max_model_len": 2048, "min_replicas": 1}
        )
    )
    up.cli("model", "apply", str(spec), "--etcd", up.state()["etcd"])

    def rounds_since() -> list[dict[str, Any]] | None:
        rounds = [s for s in up.spans(name="scheduler.round") if _ns(s["start_time"]) >= since_ns]
        placed = any(
            e["name"] == "place" and e["attributes"].get("gen_ai.request.model") == "marker"
            for s in rounds
            for e in s["events"]
        )
        return rounds if placed else None

    rounds = await eventually(rounds_since, 30, "the writing round's span in Phoenix")
    for r in rounds:  # every round span since then wrote something: none is an idle one
        a = r["attributes"]
        assert a["meshserve.placements_written"] + a["meshserve.placements_deleted"] > 0, r


def _ns(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1e9)


def prometheus_targets(up: Up) -> dict[str, str]:
    config = yaml.safe_load((up.data_dir / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    return {t["labels"]["instance"]: t["targets"][0] for t in job["static_configs"]}


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or str(ROOT / ".tools" / "bin" / "prometheus")
    if not os.access(found, os.X_OK):
        pytest.skip("prometheus not installed (bash scripts/test-tools.sh)")
    return found


@pytest.fixture(scope="module")
def prometheus(up: Up, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus with exemplar storage, scraping what `meshserve up` wrote in its
    prometheus.yml, plus one more agent on a host that NVML describes as two 80 GiB GPUs (a
    stand-in NVML: the GPUs are what is absent here) so that GPU memory has devices to show.
    That agent offers models no memory (--memory-limit), so nothing is placed on it."""
    root = tmp_path_factory.mktemp("prometheus")
    gpus = [{"uuid": f"GPU-{i:04d}", "total": 80 * GIB, "used": (i + 1) * GIB} for i in range(2)]
    (root / "nvml.json").write_text(json.dumps({"gpus": gpus}))
    env = {
        **up.env,
        "MESHSERVE_STANDIN_NVML": str(root / "nvml.json"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(STANDINS), os.environ.get("PYTHONPATH")) if p
        ),
    }
    metrics_port, ready = free_port(), root / "gpu-host.ready"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshserve",
            "agent",
            "--node-id",
            "gpu-host",
            "--etcd",
            up.state()["etcd"],
            "--metrics-port",
            str(metrics_port),
            "--memory-limit",
            "1KiB",
            "--cache-dir",
            str(root / "cache"),
            "--ready-file",
            str(ready),
        ],
        stdout=open(root / "gpu-host.log", "wb"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
        env=env,
    )
    config = yaml.safe_load((up.data_dir / "prometheus.yml").read_text())
    config["scrape_configs"][0]["static_configs"].append(
        {
            "targets": [f"127.0.0.1:{metrics_port}"],
            "labels": {"app": "nodeagent", "instance": "gpu-host"},
        }
    )
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
        ],
        stdout=open(root / "prometheus.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and _ok(f"{url}/-/ready")):
            assert agent.poll() is None, (root / "gpu-host.log").read_text()
            assert server.poll() is None, (root / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "agent or Prometheus not ready in 60 s"
            time.sleep(0.1)
        yield url
    finally:
        for proc in (server, agent):
            proc.terminate()
            proc.wait(30)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def promql(url: str, query: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": query})
    answer = get_json(f"{url}/api/v1/query?{q}")
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


async def test_prometheus_reads_the_mesh_and_an_exemplar_leads_to_its_trace(
    up: Up, prometheus: str
) -> None:
    since = time.time() - 5
    traces = {up.generate("demo") for _ in range(3)}

    def ttft_per_model() -> dict[str, float] | None:
        rows = promql(
            prometheus,
            'sum by (model) (meshserve_time_to_first_token_seconds_count{service="router"})',
        )
        counts = {r["metric"]["model"]: float(r["value"][1]) for r in rows}
        return counts if counts.get("demo", 0) >= 3 else None

    counts = await eventually(ttft_per_model, 60, "TTFT per model through Prometheus")
    assert counts["lazy"] >= 1  # the cold request of the earlier test, under its own model
    p99 = promql(
        prometheus,
        "histogram_quantile(0.99, sum by (le, model) "
        '(meshserve_time_to_first_token_seconds_bucket{service="router"}))',
    )
    assert {r["metric"]["model"] for r in p99} >= {"demo", "lazy"}
    assert all(0 < float(r["value"][1]) < 30 for r in p99), p99

    def gpu_memory() -> dict[str, tuple[float, float]] | None:
        total = promql(prometheus, 'meshserve_gpu_memory_total_bytes{instance="gpu-host"}')
        used = promql(prometheus, 'meshserve_gpu_memory_used_bytes{instance="gpu-host"}')
        per = {r["metric"]["gpu"]: float(r["value"][1]) for r in total}
        got = {g: (per[g], float(r["value"][1])) for r in used if (g := r["metric"]["gpu"]) in per}
        return got if len(got) == 2 else None

    replicas = await eventually(
        lambda: promql(prometheus, 'meshserve_replicas{model="demo"}'), 60, "replicas by tier"
    )
    assert [(r["metric"]["state"], r["metric"]["tier"], r["value"][1]) for r in replicas] == [
        ("READY", "DEVICE", "1")
    ]
    memory = await eventually(gpu_memory, 60, "GPU memory per device through Prometheus")
    assert memory == {"GPU-0000": (80 * GIB, 1 * GIB), "GPU-0001": (80 * GIB, 2 * GIB)}

    # Latency histograms carry trace ids (OpenMetrics exemplars): one leads to its trace.
    def exemplars() -> set[str]:
        q = urllib.parse.urlencode(
            {
                "query": 'meshserve_time_to_first_token_seconds_bucket{service="router"}',
                "start": since,
                "end": time.time() + 1,
            }
        )
        found = get_json(f"{prometheus}/api/v1/query_exemplars?{q}")["data"]
        return {e["labels"]["trace_id"] for series in found for e in series["exemplars"]}

    ids = await eventually(lambda: exemplars() & traces, 60, "an exemplar of our requests")
    trace_id = sorted(ids)[0]
    spans = await eventually(lambda: up.spans(trace_id=trace_id), 30, "the exemplar's trace")
    assert any(s["name"] == "meshserve.v1.Inference/Generate" for s in spans)

    # The alert rules of deploy/prometheus are loaded and evaluate without error.
    def rules() -> list[dict[str, Any]]:
        groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    assert len(rules()) >= 11
    await eventually(
        lambda: all(r["health"] == "ok" for r in rules()), 60, "every alert rule evaluated"
    )
