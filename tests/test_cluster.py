"""From laptop to cluster: config files, addresses, and a real `ray job submit`."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
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


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket is held until all are chosen (one after
    another, the OS may hand out the port it just freed again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
    (["--server-cpus", "1"], "do not fit together", "lower --server-cpus or --cpus-per-worker"),
    (["--workers", "3", "--cpus-per-worker", "2"], "--workers 3 of 2 CPU, 0 GPU each",
     "at most 1 such workers"),
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


def test_workers_alone_share_the_machines_cpus(ray_session, tmp_path, monkeypatch):
    from raysage.config import build_config
    from raysage.engine import backend
    from raysage.engine.orchestrator import simulate

    monkeypatch.setattr(backend, "local_cpus", lambda: 2)
    assert backend.share_cpus(build_config({"workers": 4})).cpus_per_worker == 0.5
    # Given, or not this run's Ray to size: left as it is.
    assert backend.share_cpus(build_config({"workers": 4, "cpus_per_worker": 2})
                              ).cpus_per_worker == 2
    assert backend.share_cpus(build_config({"workers": 4, "backend": "serial"})
                              ).cpus_per_worker == 2
    lines = []
    result = simulate(build_config({"workers": 2, "clients": 3, "rounds": 1,
                                    "samples_per_client": 10, "test_samples": 20,
                                    "out": str(tmp_path / "run")}), announce=lines.append)
    assert "on 2 worker(s) (1 CPU, 0 GPU, 1 torch thread(s) each)" in lines[0], lines
    assert result.summary["rounds"] == 1


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


def _readme_block(title: str) -> str:
    section = (REPO / "README.md").read_text().split(title, 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def _listening(pids: list[int]) -> list[str]:
    hosts = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = (proc.net_connections if hasattr(proc, "net_connections")
                     else proc.connections)("tcp")
        except psutil.Error:
            continue
        hosts += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    return hosts


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _end_head(pid: int) -> None:
    """Only the head this test started: its `ray start` process, then its process group."""
    for kill, wait in ((lambda: os.kill(pid, signal.SIGTERM), 30),
                       (lambda: os.killpg(pid, signal.SIGKILL), 10)):
        try:
            kill()
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _alive(pid):
            time.sleep(0.5)
        if not _alive(pid):
            return


def test_the_readme_local_cluster_flow_works_as_written_and_safe(tmp_path):
    """README "Locally, as on a cluster", run as written (a smaller job, free ports, its own
    folders): token authentication on, every port on 127.0.0.1, and `stop` ends it all."""
    from raysage.engine.backend import probe_ray

    block = _readme_block("**Locally, as on a cluster.**")
    size = "--clients 200 --rounds 5 --out /tmp/runs/a"
    assert size in block and "ls /tmp/runs/a" in block
    out = tmp_path / "job-run"
    block = block.replace(size, "--clients 3 --rounds 2 --samples-per-client 20 "
                                f"--test-samples 50 --align-epochs 2 --out {out}")
    block = block.replace("/tmp/runs/a", str(out))
    sweep_size = "--clients 20 --rounds 2 \\\n"
    assert sweep_size in block and "ls /tmp/runs/s" in block
    grid = tmp_path / "job-sweep"
    # The sweep's and the search's trials train in their own processes, two at a time
    # (each run's Ray path is tested elsewhere): the test stays short.
    block = block.replace(sweep_size, "--clients 3 --rounds 2 --samples-per-client 20 "
                                      "--test-samples 50 --align-epochs 2 --backend serial "
                                      "--cpus-per-worker 1 \\\n")
    block = block.replace("/tmp/runs/s", str(grid))
    assert block.count("--samples-per-client 20") == 3 and "cat /tmp/runs/t/best.yaml" in block
    search = tmp_path / "job-tune"
    # Two trials show the search runs as a job and writes its best config; the six-trial
    # search with ASHA is tested on its own (tests/test_tune.py).
    assert block.count("--samples 6 ") == 1
    block = block.replace("--samples 6 ", "--samples 2 ").replace("/tmp/runs/t", str(search))
    lines = block.strip().splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("cluster/local-head.sh stop"))
    head_dir = Path(tempfile.mkdtemp(prefix="rsg", dir="/tmp"))  # short: Ray's socket paths
    home = tmp_path / "home"
    home.mkdir()
    gcs, dashboard = _free_ports(2)
    env = _cli_env(home, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   RAYSAGE_HEAD_DIR=str(head_dir), RAYSAGE_GCS_PORT=str(gcs),
                   RAYSAGE_DASHBOARD_PORT=str(dashboard))

    def bash(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)

    head = None
    try:
        ran = bash("\n".join(lines[:stop]))
        if (head_dir / "head.pid").exists():
            head = int((head_dir / "head.pid").read_text())
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert "Ray cluster of 1 node(s), 2 CPUs" in ran.stdout, ran.stdout[-3000:]
        assert "workers placed: 1 on" in ran.stdout and "raysubmit_" in ran.stdout
        assert pq.read_table(out / "rounds.parquet").num_rows == 2
        assert "rounds.parquet" in ran.stdout and (out / "summary.json").exists()
        # the sweep, as one job on the token-authenticated head: every point finished
        assert "4/4 points finished" in ran.stdout, ran.stdout[-3000:]
        assert len(list(grid.glob("seed=*__client_lr=*/summary.json"))) == 4
        # and the search: every trial has a run folder, and there is a best config
        assert len(list(search.glob("trial_*/rounds.parquet"))) == 2
        assert "client_lr:" in (search / "best.yaml").read_text()
        assert "best: client_lr=" in ran.stdout, ran.stdout[-3000:]

        assert (home / ".ray" / "auth_token").exists()
        processes = [head] + [p.pid for p in psutil.Process(head).children(recursive=True)]
        hosts = _listening(processes)
        assert hosts and set(hosts) <= {"127.0.0.1", "::ffff:127.0.0.1"}, hosts
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=10)
        assert denied.value.code == 401
        assert probe_ray(f"127.0.0.1:{gcs}", client=False, timeout=5)[0] == "auth"
        # From elsewhere: the head's token in RAY_AUTH_TOKEN and nothing else.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        token = (home / ".ray" / "auth_token").read_text().strip()
        remote = _cli_env(elsewhere, PATH=env["PATH"], RAY_AUTH_TOKEN=token,
                          RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}")
        helped = subprocess.run(["cluster/submit.sh", "--help"], cwd=REPO, env=remote,
                                capture_output=True, text=True, timeout=300)
        assert helped.returncode == 0 and "--cpus-per-worker" in helped.stdout, \
            helped.stdout[-2000:] + helped.stderr[-2000:]

        stopped = bash("\n".join(lines[stop:]))
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in processes):
            time.sleep(0.5)
        assert not [p for p in processes if _alive(p)]
        head = None
    finally:
        if head is not None:
            _end_head(head)
        shutil.rmtree(head_dir, ignore_errors=True)


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
