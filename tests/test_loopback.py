"""A local run's Ray listens on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

# Starts raysage's own Ray (not the tests' shared one), lists what every process of
# this tree listens on, and ends it.
LISTEN = r"""
import json, os, psutil
from raysage.config import build_config
from raysage.engine.backend import RayBackend

backend = RayBackend(build_config({"backend": "ray", "cpus_per_worker": 1}))
import ray

@ray.remote
def pid():
    return os.getpid()

ray.get(pid.remote())
tree = psutil.Process()
pids = {p.pid for p in [tree, *tree.children(recursive=True)]}
found = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.pid in pids})
print(json.dumps(found))
backend.close()
"""


def test_a_local_run_binds_loopback_only():
    """Every socket the run's Ray listens on, its GCS, raylet, agents and workers among
    them, is on 127.0.0.1 (or its IPv6-mapped form)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", LISTEN], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    listening = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in listening}
    # Ray's own processes are among them: the GCS, the raylet and its agents.
    assert {"gcs_server", "raylet"} <= names, listening
    outside = [(ip, port, name) for ip, port, name in listening
               if not _loopback(ip)]
    assert not outside, outside


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
