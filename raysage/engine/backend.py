"""Where client workers and the server run: in-process (serial) or as Ray actors.

Both backends offer the same five verbs -- create, put, call, get, close --
so the orchestrator is one piece of code. With Ray, ``call`` returns object
references and passes them on unresolved: smashed activations go from a
client worker to the server, and replies back, through the object store,
never through the driver.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

from ..config import Config
from ..errors import RaysageError, one_line

# How long a run waits for reservations that other jobs hold before it gives up.
RESOURCE_WAIT_S = 60.0
# A Ray GCS or client server answers a probe in milliseconds; this bounds a silent one.
PROBE_TIMEOUT_S = 5.0


class ActorFailure(RaysageError):
    """A worker or the server process died; the run can recover from a checkpoint."""


class SerialBackend:
    """Everything in this process, in the plan's causal order."""

    name = "serial"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def worker_count(self, num_clients: int) -> int:
        return max(1, min(self.cfg.workers or 1, num_clients))

    def describe(self) -> str:
        return "in-process serial backend"

    def available_memory(self) -> float:
        import psutil

        return psutil.virtual_memory().available

    def create(self, cls, *args, server: bool = False, slot: int = 0):
        return cls(*args)

    def put(self, value):
        return value

    def call(self, target, method: str, *args, num_returns: int = 1):
        return getattr(target, method)(*args)

    def get(self, value):
        return value

    def settle(self, refs: list, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for calls whose results do not matter."""

    def kill(self, actor) -> None:
        pass

    def close(self) -> None:
        pass


class RayBackend:
    """Client workers and the server as Ray actors with fractional resources."""

    name = "ray"

    def __init__(self, cfg: Config):
        import ray

        self.cfg = cfg
        self.ray = ray
        self.started_here = False
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if cfg.address:
            # Even in a process already connected to Ray (a notebook, tests), a
            # named cluster that does not answer is an error, not ignored.
            check_cluster(cfg.address, "--address")
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "1")
            if address:
                if not cfg.address:  # from RAY_ADDRESS, not yet checked above
                    check_cluster(address, "RAY_ADDRESS")
                try:
                    ray.init(address=address, logging_level="WARNING")
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise RaysageError(f"cannot join the Ray cluster at {address}: "
                                       f"{one_line(exc)}; check --address / RAY_ADDRESS"
                                       ) from None
            else:
                # Keep Ray quiet and light on a laptop: warnings only, and the
                # dashboard's web UI (and its memory) only when asked for; and
                # reachable from this machine only.
                with loopback_only():
                    ray.init(include_dashboard=cfg.dashboard, logging_level="WARNING",
                             log_to_driver=True, _node_ip_address="127.0.0.1",
                             dashboard_host="127.0.0.1")
            self.started_here = True
        # A run started inside a placement group (a sweep's or a search's trial) places
        # its actors in that group's bundles: the server in its own when it reserves
        # anything (else beside the first worker), one client worker in each of the
        # others (see ``trial_bundles``).
        self.group = ray.util.get_current_placement_group()
        resources = ray.cluster_resources()
        self.cpus = float(resources.get("CPU", 0))
        self.gpus = float(resources.get("GPU", 0))
        self.node_resources = [(float(n["Resources"].get("CPU", 0)),
                                float(n["Resources"].get("GPU", 0)))
                               for n in ray.nodes() if n.get("Alive")]
        self.nodes = len(self.node_resources)
        for name in ("gpus_per_worker", "server_gpus"):
            if getattr(cfg, name) > 0 and self.gpus == 0:
                flag = "--" + name.replace("_", "-")
                raise RaysageError(f"{name} = {getattr(cfg, name)} but the Ray cluster has no GPU; "
                                   f"set {flag} 0 or connect to a cluster with GPUs")

    def worker_count(self, num_clients: int) -> int:
        cfg = self.cfg
        if self.group is not None:
            slots = len(self.group.bundle_specs) - self._head_bundles
            if cfg.workers > slots:
                raise RaysageError(f"--workers {cfg.workers} do not fit the {slots} worker "
                                   "bundles of the placement group this run started in")
            return max(1, min(cfg.workers or slots, num_clients))
        # The workers a trial of this run would reserve: the same count either way.
        count = min(len(trial_bundles(cfg, self.node_resources, self.describe()))
                    - 1 - self._head_bundles, num_clients)
        self.wait_for_room(count)
        return count

    def wait_for_room(self, count: int) -> None:
        """Wait, boundedly, until the cluster has the run's reservations free.

        The totals fit (``worker_count`` checked them); what other jobs hold
        now may not, and Ray would then queue our actors without a word.
        """
        cfg = self.cfg
        raw = os.environ.get("RAYSAGE_RESOURCE_WAIT_S", str(RESOURCE_WAIT_S))
        try:
            patience = float(raw)
        except ValueError:
            raise RaysageError(f"RAYSAGE_RESOURCE_WAIT_S = {raw!r} is not a number of seconds; "
                               "fix or unset it") from None
        deadline = time.monotonic() + patience
        while True:
            free = self.free_node_resources()
            room = most_workers(free, cfg)
            if room >= count:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        free_cpus, free_gpus = (sum(n[i] for n in free) for i in (0, 1))
        raise RaysageError(
            f"the {self.describe()} has room for {max(room, 0)} of the {count} workers of "
            f"{cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU (and the server of "
            f"{cfg.server_cpus:g} CPU, {cfg.server_gpus:g} GPU) after {patience:g} s: other jobs "
            f"hold the rest ({free_cpus:g} CPUs, {free_gpus:g} GPUs free); wait for them to "
            "finish or lower --workers, --cpus-per-worker or --gpus-per-worker")

    def free_node_resources(self) -> list[tuple[float, float]]:
        try:
            from ray._private.state import available_resources_per_node

            per_node = available_resources_per_node().values()
        except Exception:  # a Ray without the per-node view: the cluster as one node
            per_node = [self.ray.available_resources()]
        return [(float(r.get("CPU", 0)), float(r.get("GPU", 0))) for r in per_node]

    def describe(self) -> str:
        return (f"Ray cluster of {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs")

    def available_memory(self) -> float:
        """Memory Ray may give to tasks and actors across the cluster, plus its object store."""
        resources = self.ray.available_resources()
        return float(resources.get("memory", 0) + resources.get("object_store_memory", 0))

    @property
    def _head_bundles(self) -> int:
        """Bundles of a trial's placement group before its workers': the server's, when
        it reserves anything (Tune leaves out the trial's own, which is empty)."""
        return int(_server_reserves(self.cfg))

    def create(self, cls, *args, server: bool = False, slot: int = 0):
        """The server, or client worker number ``slot``, as an actor."""
        cfg = self.cfg
        if server:
            options = dict(num_cpus=cfg.server_cpus, num_gpus=cfg.server_gpus)
        else:
            options = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                           max_concurrency=cfg.worker_threads,
                           # Workers spread over the cluster's nodes rather than packing
                           # the first.
                           scheduling_strategy="SPREAD")
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=0 if server else
                self._head_bundles + slot)
        return self.ray.remote(cls).options(**options).remote(*args)

    def put(self, value):
        return self.ray.put(value)

    def call(self, target, method: str, *args, num_returns: int = 1):
        return getattr(target, method).options(num_returns=num_returns).remote(*args)

    def get(self, value):
        errors = self.ray.exceptions
        try:
            return self.ray.get(value)
        except (errors.RayActorError, errors.WorkerCrashedError, errors.ObjectLostError,
                errors.OwnerDiedError) as exc:
            raise ActorFailure(f"an actor process died ({type(exc).__name__})") from None
        except self.ray.exceptions.RayTaskError as exc:
            # Our own errors are for the user: show their one line, not Ray's trace.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RaysageError):
                raise type(cause)(str(cause)) from None
            raise

    def settle(self, refs: list, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for calls whose results do not matter."""
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


@contextlib.contextmanager
def loopback_only():
    """While a local Ray starts: every process it starts binds 127.0.0.1 only.

    On Linux Ray runs in its cluster mode and binds its GCS, raylet, workers and
    agents on every interface, whatever the node address; its single-machine
    mode (the one it uses on macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    binds them to loopback. Ray reads that setting when it is imported, so it is
    set here on Ray's constant as well as in the environment, and both are put
    back once the node is up: a later connection to a real cluster from this
    process must see Ray's cluster mode again.
    """
    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before = os.environ.get(name)
    os.environ[name] = "0"
    constants = None
    try:
        from ray._private import ray_constants as constants

        mode, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    except (ImportError, AttributeError):   # a Ray without it: the environment must do
        constants = None
    try:
        yield
    finally:
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = mode
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _fits(node: tuple[float, float], cpus: float, gpus: float) -> bool:
    return node[0] + 1e-9 >= cpus and node[1] + 1e-9 >= gpus


def _per_node(node: tuple[float, float], cpus: float, gpus: float) -> int:
    counts = [math.floor(have / need + 1e-9) for have, need in zip(node, (cpus, gpus))
              if need > 0]
    return max(0, min(counts)) if counts else 0


def most_workers(nodes: list[tuple[float, float]], cfg: Config) -> int:
    """Most client workers the nodes (CPUs, GPUs each) hold beside the server; -1 when
    the server fits on no node. Every reservation must fit whole on one node."""
    best = -1
    for i, node in enumerate(nodes):
        if not _fits(node, cfg.server_cpus, cfg.server_gpus):
            continue
        rest = list(nodes)
        rest[i] = (node[0] - cfg.server_cpus, node[1] - cfg.server_gpus)
        best = max(best, sum(_per_node(n, cfg.cpus_per_worker, cfg.gpus_per_worker)
                             for n in rest))
    return best


def placeable_workers(nodes: list[tuple[float, float]], cfg: Config, cluster: str) -> int:
    """``most_workers``, or a one-line error naming the reservation that can never be met
    (Ray would otherwise wait for it forever)."""
    largest = (max((n[0] for n in nodes), default=0.0), max((n[1] for n in nodes), default=0.0))
    biggest = f"its largest node has {largest[0]:g} CPUs and {largest[1]:g} GPUs"
    for cpus, gpus, flags in (
            (cfg.server_cpus, cfg.server_gpus, ("--server-cpus", "--server-gpus")),
            (cfg.cpus_per_worker, cfg.gpus_per_worker, ("--cpus-per-worker", "--gpus-per-worker"))):
        if any(_fits(n, cpus, gpus) for n in nodes):
            continue
        too_big = [(flag, value) for flag, value, have in zip(flags, (cpus, gpus), largest)
                   if value > have + 1e-9] or list(zip(flags, (cpus, gpus)))
        given = " with ".join(f"{flag} {value:g}" for flag, value in too_big)
        lower = " or ".join(flag for flag, _ in too_big)
        raise RaysageError(f"{given} fits on no node of the {cluster} ({biggest}); one "
                           f"reservation must fit on one node: lower {lower}")
    fit = most_workers(nodes, cfg)
    if fit < 1:
        raise RaysageError(
            f"the server ({cfg.server_cpus:g} CPU, {cfg.server_gpus:g} GPU) and one client worker "
            f"({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU) do not fit together on "
            f"the {cluster} ({biggest}); lower --server-cpus or --cpus-per-worker (or their "
            "GPU counterparts)")
    return fit


def trial_bundles(cfg: Config, nodes: list[tuple[float, float]], cluster: str
                  ) -> list[dict[str, float]]:
    """The placement group a sweep's trial reserves for a run of ``cfg``: the bundle of
    the trial's own process (which drives a Ray run, free, and trains a serial run's
    clients itself), the server's unless it reserves nothing, then one per client
    worker, as many as ``simulate`` would start on these nodes. A reservation that can
    never be met is a one-line error."""
    if cfg.backend != "ray":
        return [{"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}]
    fit = placeable_workers(nodes, cfg, cluster)
    if cfg.workers > fit:
        raise RaysageError(
            f"--workers {cfg.workers} of {cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} "
            f"GPU each beside a server of {cfg.server_cpus:g} CPU, {cfg.server_gpus:g} GPU do "
            f"not fit on the {cluster} (at most {fit} such workers); lower --workers, "
            "--cpus-per-worker or --gpus-per-worker")
    workers = max(1, min(cfg.workers or fit, cfg.clients))
    server = [{"CPU": cfg.server_cpus, "GPU": cfg.server_gpus}] if _server_reserves(cfg) else []
    return [{}] + server + [{"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker}] * workers


def _server_reserves(cfg: Config) -> bool:
    return cfg.server_cpus > 0 or cfg.server_gpus > 0


def _host_port(address: str) -> tuple[str, int]:
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RaysageError(f"Ray address {address!r} is not host:port, ray://host:port or auto; "
                           "fix --address / RAY_ADDRESS")
    return host.strip("[]"), int(port)


def check_cluster(address: str, source: str = "--address", timeout: float = PROBE_TIMEOUT_S
                  ) -> None:
    """Fail in seconds, with one line, unless a Ray cluster that lets us in answers at
    ``address``. ``ray.init`` would otherwise retry for minutes against a closed port,
    something that is not Ray, or a cluster that wants a token we do not send."""
    if address == "auto":
        return
    if address.startswith(("http://", "https://")):
        raise RaysageError(
            f"{source} {address} is a dashboard (job API) address, which `ray job submit` and "
            "cluster/submit.sh take; raysage simulate joins a cluster's GCS: set it to "
            "HOST:6379 (or ray://HOST:10001), or unset RAY_ADDRESS to start a local Ray")
    host, port = _host_port(address)
    check_reachable(address, host, port, timeout=min(timeout, 3.0))
    client = address.startswith("ray://")
    if not client and "://" in address:
        return  # another scheme: Ray's to interpret
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS cluster: the TCP check above is as far as a plain probe goes
    dialled = address
    if not client:
        # Ray dials 127.0.0.1 as this machine's own address (so that other
        # nodes could reach it); probe what it will dial.
        try:
            from ray._private.services import canonicalize_bootstrap_address

            dialled = canonicalize_bootstrap_address(address) or address
        except Exception:
            pass
    problem = probe_ray(dialled, client=client, timeout=timeout)
    if problem is None:
        return
    if dialled != address and problem[0] == "unreachable":
        given = probe_ray(address, client=client, timeout=timeout)
        if given is None or given[0] == "auth":
            raise RaysageError(
                f"the Ray head at {address} listens on 127.0.0.1 only, but Ray dials it as "
                f"{dialled}; export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-machine "
                "mode, as cluster/local-head.sh runs it) or submit the run with "
                "cluster/submit.sh")
        problem = given  # what listens where the user pointed
    kind, detail = problem
    if kind == "auth":
        raise RaysageError(auth_advice(address, detail))
    if kind == "unreachable":
        raise RaysageError(f"no Ray cluster answers at {address} (Ray dials {dialled}: {detail}); "
                           f"start one with `ray start --head` or fix {source}")
    raise RaysageError(
        f"{address} answers but not as a Ray {'client server' if client else 'cluster (GCS)'} "
        f"({detail}); give the head's GCS address (HOST:6379) or ray://HOST:10001 in "
        f"{source}")


def check_reachable(address: str, host: str, port: int, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RaysageError(f"no Ray cluster answers at {address} ({reason}); start one with "
                           "`ray start --head` or fix --address / RAY_ADDRESS") from None


def auth_metadata() -> list[tuple[str, str]]:
    """The token header Ray itself would send: only in token mode, and only if it finds one."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return []
    token = _find_token()
    return [("authorization", f"Bearer {token}")] if token else []


def _find_token() -> str | None:
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return loader.get_raw_token(ignore_auth_mode=True)
    except Exception:  # a Ray without token authentication
        pass
    return None


def auth_advice(address: str, detail: str) -> str:
    """What to set when a cluster refuses us for want of the right token."""
    where = ("(`ray get-auth-token` on the cluster's head prints it; on the head itself Ray "
             "reads ~/.ray/auth_token)")
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() != "token":
        found = (" RAY_AUTH_TOKEN is set, but Ray sends a token only in token mode;"
                 if os.environ.get("RAY_AUTH_TOKEN") else "")
        return (f"the Ray cluster at {address} requires token authentication ({detail});"
                f"{found} export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN "
                f"{where}")
    if _find_token() is None:
        return (f"the Ray cluster at {address} requires token authentication and "
                "RAY_AUTH_MODE=token, but no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                f"or ~/.ray/auth_token); export the cluster's token as RAY_AUTH_TOKEN {where}")
    return (f"the Ray cluster at {address} refuses this machine's token ({detail}); export "
            f"the cluster's own token as RAY_AUTH_TOKEN {where}")


def probe_ray(address: str, *, client: bool, timeout: float) -> tuple[str, str] | None:
    """Ask a Ray GCS (or Ray client server) for its cluster id over gRPC. None when it
    answers; otherwise ('auth' | 'unreachable' | 'foreign', detail)."""
    try:
        import grpc

        if client:
            from ray.core.generated import ray_client_pb2 as pb, ray_client_pb2_grpc as rpc
        else:
            from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc
    except ImportError:  # a Ray without these stubs: leave the check to ray.init
        return None
    host, port = _host_port(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            if client:
                rpc.RayletDriverStub(channel).ClusterInfo(
                    pb.ClusterInfoRequest(type=pb.ClusterInfoType.PING), timeout=timeout,
                    metadata=auth_metadata())
            else:
                rpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    pb.GetClusterIdRequest(), timeout=timeout, metadata=auth_metadata())
        except grpc.RpcError as exc:
            code, detail = exc.code(), (exc.details() or "").strip()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return "auth", detail.split(":")[0] or code.name
            if code == grpc.StatusCode.UNAVAILABLE and "HTTP/2" in detail:
                return "foreign", "it does not speak gRPC; an HTTP server?"
            if code == grpc.StatusCode.UNAVAILABLE:
                return "unreachable", detail
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "foreign", f"no gRPC answer within {timeout:g} s"
            return "foreign", f"gRPC {code.name}"
    return None


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:     # not Linux
        return os.cpu_count() or 1


def share_cpus(cfg: Config) -> Config:
    """``--workers N`` without ``--cpus-per-worker``, on a Ray this run starts: the
    machine's CPUs (less the server's) shared among the N workers, instead of N
    workers of the default 2 CPUs that would not fit."""
    given = cfg.model_fields_set
    if (cfg.backend != "ray" or not cfg.workers or "cpus_per_worker" in given
            or cfg.gpus_per_worker or cfg.address or os.environ.get("RAY_ADDRESS")):
        return cfg
    cpus = max(local_cpus() - cfg.server_cpus, 1.0)
    return cfg.replace(cpus_per_worker=cpus / cfg.workers)


def make_backend(cfg: Config):
    return RayBackend(cfg) if cfg.backend == "ray" else SerialBackend(cfg)
