"""From laptop to cluster: config files, addresses, and a real `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from raysage.cli import app

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"


def test_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster/ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])


def test_kuberay_rayjob_has_the_required_fields():
    job = yaml.safe_load((REPO / "cluster/kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "raysage.cli simulate" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:")
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "replicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" in limits
    assert (REPO / ".rayignore").read_text().count("runs/") == 1


def test_a_bad_address_fails_within_seconds():
    start = time.time()
    result = CliRunner().invoke(app, ["simulate", "--address", "127.0.0.1:1", "--rounds", "1"])
    assert result.exit_code == 2 and "no Ray cluster answers at 127.0.0.1:1" in result.output
    assert time.time() - start < 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_env() -> dict[str, str]:
    # A loopback-only test cluster: no token authentication (Ray 2.60 turns it on by
    # default); real clusters keep it, see README "Running on a cluster".
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture
def local_cluster(monkeypatch):
    """A Ray head on 127.0.0.1 in its own process group, ended by group when done."""
    gcs, dashboard = _free_port(), _free_port()
    # Every port of our own: another Ray on this machine (a user's, or a
    # running experiment) holds the default ones, and a job agent that cannot
    # bind its default port never comes up ("No available agent").
    agent_http, agent_grpc, runtime_env, client_server = (_free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="rsg", dir="/tmp")  # short: Ray's socket paths
    env = _local_env()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # for the job client in this process
    head = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", "--block", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--ray-client-server-port={client_server}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the local Ray head did not come up within 120 s")
                time.sleep(1)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def test_ray_job_submit_runs_a_simulation(local_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job-run"
    env = _local_env()
    command = [str(RAY_BIN), "job", "submit", "--address", local_cluster,
               "--working-dir", str(REPO), "--submission-id", "raysage-e2e", "--no-wait", "--",
               sys.executable, "-m", "raysage.cli", "simulate", "--clients", "3", "--rounds", "2",
               "--samples-per-client", "20", "--test-samples", "50", "--align-epochs", "2",
               "--out", str(out)]
    # The dashboard answers before its job agent is ready; Ray says to try again
    # later. On a loaded machine the agent has taken over two minutes.
    patience = time.time() + 300
    while True:
        submitted = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        if ("No available agent" not in submitted.stderr + submitted.stdout
                or time.time() > patience):
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    client = JobSubmissionClient(local_cluster)
    deadline = time.time() + 300
    while (status := client.get_job_status("raysage-e2e")) not in (
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish within 300 s"
        time.sleep(2)
    logs = client.get_job_logs("raysage-e2e")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "Ray cluster of 1 node(s), 2 CPUs" in logs and "workers placed: 2 on" in logs
    assert pq.read_table(out / "rounds.parquet").num_rows == 2
    assert (out / "summary.json").exists()


def test_results_go_to_a_filesystem_uri_and_resume_from_it(tmp_path):
    from raysage.config import build_config
    from raysage.engine.orchestrator import simulate

    uri = f"file://{tmp_path}/remote/run-a"
    fields = {"clients": 2, "samples_per_client": 20, "rounds": 2, "test_samples": 30,
              "backend": "serial", "align_epochs": 1, "checkpoint_every": 1}
    result = simulate(build_config(fields | {"out": uri}), announce=lambda _: None)
    assert result.summary["run_dir"] == uri
    folder = tmp_path / "remote/run-a"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.json", "clients.parquet", "config.yaml", "rounds.parquet", "run.parquet",
        "state", "summary.json"]
    assert pq.read_table(folder / "rounds.parquet").num_rows == 2
    again = simulate(build_config({}), resume=uri, announce=lambda _: None)
    assert [r["round"] for r in again.rounds] == [0, 1]   # already complete: nothing re-run
    bad = CliRunner().invoke(app, ["simulate", "--out", "nosuchscheme://bucket/run",
                                   "--backend", "serial", "--rounds", "1"])
    assert bad.exit_code == 2 and "cannot use 'nosuchscheme://bucket/run'" in bad.output
