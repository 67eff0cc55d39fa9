"""From laptop to cluster: config files, addresses, and a real `ray job submit`."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from raysage.cli import app
from raysage.config import build_config
from raysage.errors import RaysageError

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


def invoke_within(seconds: float, args: list[str]):
    """The CLI in-process, failing (rather than hanging the suite) past ``seconds``."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=CliRunner().invoke(app, args)),
                              daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"raysage {' '.join(args)} still runs after {seconds} s"
    return box["result"], time.monotonic() - start


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


TINY = ["--clients", "3", "--rounds", "1", "--samples-per-client", "10", "--test-samples", "20"]


@pytest.mark.parametrize("flags,what,todo", [
    (["--cpus-per-worker", "100"], "--cpus-per-worker 100 fits on no node", "lower --cpus-per-worker"),
    (["--cpus-per-worker", "3"], "--cpus-per-worker 3 fits on no node", "lower --cpus-per-worker"),
    (["--server-cpus", "100"], "--server-cpus 100 fits on no node", "lower --server-cpus"),
    (["--server-cpus", "2"], "do not fit together", "lower --server-cpus or --cpus-per-worker"),
    (["--workers", "3"], "--workers 3 of 1 CPU, 0 GPU each", "at most 2 such workers"),
])
def test_reservations_that_can_never_be_met_are_refused_within_seconds(ray_session, tmp_path,
                                                                        flags, what, todo):
    out = tmp_path / "run"
    result, elapsed = invoke_within(60, ["simulate", *TINY, *flags, "--out", str(out)])
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and what in lines[0] and todo in lines[0], lines[0]
    assert "2 CPUs" in lines[0]                       # what the session's cluster has
    assert elapsed < 10 and not out.exists()


def test_every_reservation_must_fit_on_one_node():
    from raysage.engine.backend import placeable_workers

    # cluster/ray-cluster.yaml: a 0-CPU head and two g5.2xlarge (8 CPUs, 1 GPU).
    nodes = [(0.0, 0.0), (8.0, 1.0), (8.0, 1.0)]
    kuberay = build_config({"cpus_per_worker": 1, "gpus_per_worker": 0.25, "server_cpus": 4,
                            "server_gpus": 0.5})
    assert placeable_workers(nodes, kuberay, "test cluster") == 6   # 4, and 2 beside the server
    with pytest.raises(RaysageError, match=r"^--cpus-per-worker 10 fits on no node of the test "
                       r"cluster \(its largest node has 8 CPUs and 1 GPUs\)"):
        placeable_workers(nodes, build_config({"cpus_per_worker": 10}), "test cluster")
    with pytest.raises(RaysageError, match="^--server-gpus 1.5 fits on no node"):
        placeable_workers(nodes, build_config({"server_gpus": 1.5}), "test cluster")
    with pytest.raises(RaysageError, match="^--server-cpus 8 with --server-gpus 1 fits on no"):
        placeable_workers([(8.0, 0.0), (2.0, 1.0)],
                          build_config({"server_cpus": 8, "server_gpus": 1}), "test cluster")


def test_a_run_waits_boundedly_for_resources_that_other_jobs_hold(ray_session, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("RAYSAGE_RESOURCE_WAIT_S", "2")

    @ray_session.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        ray_session.get(holder.ready.remote(), timeout=120)
        out = tmp_path / "run"
        result, elapsed = invoke_within(60, ["simulate", *TINY, "--workers", "1",
                                             "--out", str(out)])
    finally:
        ray_session.kill(holder)
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "has room for 0 of the 1 workers" in lines[0] and "after 2 s" in lines[0]
    assert "other jobs hold the rest (0 CPUs, 0 GPUs free)" in lines[0]
    assert elapsed < 15 and not out.exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("scheme,kind", [("", "cluster (GCS)"), ("ray://", "client server")])
def test_an_address_where_something_else_listens_fails_within_seconds(tmp_path, scheme, kind):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"{scheme}127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "run"
        result, elapsed = invoke_within(60, ["simulate", *TINY, "--address", address,
                                             "--out", str(out)])
    finally:
        server.shutdown()
    assert result.exit_code == 2 and error_lines(result.output) == [
        f"error: {address} answers but not as a Ray {kind} (it does not speak gRPC; an HTTP "
        "server?); give the head's GCS address (HOST:6379) or ray://HOST:10001 in --address"]
    assert elapsed < 10 and not out.exists()


def _cli_env(home: Path, **changes: str) -> dict[str, str]:
    """This environment without Ray addresses or tokens, and a home without ~/.ray."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH"))}
    env["HOME"] = str(home)
    env.update(changes)
    return env


def _session_token() -> str:
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True)


@pytest.mark.parametrize("setting,advice", [
    ({}, "requires token authentication (InvalidAuthToken); export RAY_AUTH_MODE=token and the "
         "cluster's token as RAY_AUTH_TOKEN (`ray get-auth-token` on the cluster's head "
         "prints it"),
    ({"RAY_AUTH_TOKEN": "session"}, "RAY_AUTH_TOKEN is set, but Ray sends a token only in "
                                    "token mode; export RAY_AUTH_MODE=token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
     "refuses this machine's token (InvalidAuthToken); export the cluster's own token as "
     "RAY_AUTH_TOKEN"),
])
def test_joining_a_cluster_with_token_authentication_says_what_to_set(ray_session, tmp_path,
                                                                      setting, advice):
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("the test session's Ray runs without token authentication")
    setting = {k: _session_token() if v == "session" else v for k, v in setting.items()}
    gcs = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raysage.cli", "simulate", *TINY, "--address",
                           gcs, "--out", str(out)], env=_cli_env(tmp_path, **setting),
                          capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - start
    lines = error_lines(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: the Ray cluster at {gcs} ") and advice in lines[0], lines
    assert elapsed < 15 and not out.exists()


def test_a_dashboard_address_in_ray_address_is_explained_in_one_whole_line(tmp_path):
    out = tmp_path / "run"
    env = _cli_env(tmp_path, RAY_ADDRESS="http://127.0.0.1:8265")
    proc = subprocess.run([sys.executable, "-m", "raysage.cli", "simulate", *TINY,
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2 and error_lines(proc.stdout + proc.stderr) == [
        "error: RAY_ADDRESS http://127.0.0.1:8265 is a dashboard (job API) address, which "
        "`ray job submit` and cluster/submit.sh take; raysage simulate joins a cluster's GCS: "
        "set it to HOST:6379 (or ray://HOST:10001), or unset RAY_ADDRESS to start a local Ray"]
    assert not out.exists()


def test_one_line_keeps_the_whole_message():
    from raysage.errors import one_line

    assert one_line(ValueError("Invalid: x. To fix this, either:\n  1. unset it, or\n  2. set "
                               "it\n")) == "Invalid: x. To fix this, either: 1. unset it, or 2. set it"


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
        "checkpoint.pt", "clients.parquet", "config.yaml", "rounds.parquet", "run.parquet",
        "summary.json"]
    assert pq.read_table(folder / "rounds.parquet").num_rows == 2
    again = simulate(build_config({}), resume=uri, announce=lambda _: None)
    assert [r["round"] for r in again.rounds] == [0, 1]   # already complete: nothing re-run
    bad = CliRunner().invoke(app, ["simulate", "--out", "nosuchscheme://bucket/run",
                                   "--backend", "serial", "--rounds", "1"])
    assert bad.exit_code == 2 and "cannot use 'nosuchscheme://bucket/run'" in bad.output
