"""Where client workers and the server run: in-process (serial) or as Ray actors.

Both backends offer the same five verbs -- create, put, call, get, close --
so the orchestrator is one piece of code. With Ray, ``call`` returns object
references and passes them on unresolved: smashed activations go from a
client worker to the server, and replies back, through the object store,
never through the driver.
"""

from __future__ import annotations

import os

from ..config import Config
from ..errors import RaysageError


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

    def create(self, cls, *args, server: bool = False):
        return cls(*args)

    def put(self, value):
        return value

    def call(self, target, method: str, *args, num_returns: int = 1):
        return getattr(target, method)(*args)

    def get(self, value):
        return value

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
            check_reachable(cfg.address)
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "1")
            if address:
                if not cfg.address:  # from RAY_ADDRESS, not yet checked above
                    check_reachable(address)
                try:
                    ray.init(address=address, logging_level="WARNING")
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise RaysageError(f"cannot join the Ray cluster at {address}: "
                                       f"{str(exc).splitlines()[0]}; check --address / "
                                       "RAY_ADDRESS") from None
            else:
                # Keep Ray quiet and light on a laptop: warnings only, and the
                # dashboard's web UI (and its memory) only when asked for.
                ray.init(include_dashboard=cfg.dashboard, logging_level="WARNING",
                         log_to_driver=True)
            self.started_here = True
        resources = ray.cluster_resources()
        self.cpus = float(resources.get("CPU", 0))
        self.gpus = float(resources.get("GPU", 0))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        for name in ("gpus_per_worker", "server_gpus"):
            if getattr(cfg, name) > 0 and self.gpus == 0:
                flag = "--" + name.replace("_", "-")
                raise RaysageError(f"{name} = {getattr(cfg, name)} but the Ray cluster has no GPU; "
                                   f"set {flag} 0 or connect to a cluster with GPUs")

    def worker_count(self, num_clients: int) -> int:
        cfg = self.cfg
        if cfg.workers:
            count = cfg.workers
        else:
            # As many workers as the reservations fit beside the server's.
            fits = []
            if cfg.cpus_per_worker > 0:
                fits.append((self.cpus - cfg.server_cpus) // cfg.cpus_per_worker)
            if cfg.gpus_per_worker > 0:
                fits.append((self.gpus - cfg.server_gpus) // cfg.gpus_per_worker)
            count = int(min(fits)) if fits else 1
        needed_cpus = count * cfg.cpus_per_worker + cfg.server_cpus
        if needed_cpus > self.cpus + 1e-9:
            raise RaysageError(f"{count} workers x {cfg.cpus_per_worker} CPUs + server "
                               f"{cfg.server_cpus} CPUs need {needed_cpus:g} CPUs but the Ray "
                               f"cluster has {self.cpus:g}; lower --workers or --cpus-per-worker")
        return max(1, min(count, num_clients))

    def describe(self) -> str:
        return (f"Ray cluster of {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs")

    def available_memory(self) -> float:
        """Memory Ray may give to tasks and actors across the cluster, plus its object store."""
        resources = self.ray.available_resources()
        return float(resources.get("memory", 0) + resources.get("object_store_memory", 0))

    def create(self, cls, *args, server: bool = False):
        cfg = self.cfg
        if server:
            actor = self.ray.remote(cls).options(num_cpus=cfg.server_cpus,
                                                 num_gpus=cfg.server_gpus)
        else:
            # Workers spread over the cluster's nodes rather than packing the first.
            actor = self.ray.remote(cls).options(num_cpus=cfg.cpus_per_worker,
                                                 num_gpus=cfg.gpus_per_worker,
                                                 scheduling_strategy="SPREAD")
        return actor.remote(*args)

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

    def kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address."""
    import socket

    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RaysageError(f"Ray address {address!r} is not host:port, ray://host:port or auto; "
                           "fix --address / RAY_ADDRESS")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RaysageError(f"no Ray cluster answers at {address} ({reason}); start one with "
                           "`ray start --head` or fix --address / RAY_ADDRESS") from None


def make_backend(cfg: Config):
    return RayBackend(cfg) if cfg.backend == "ray" else SerialBackend(cfg)
