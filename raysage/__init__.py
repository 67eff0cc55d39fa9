"""raysage: an asynchronous, actor-based simulator of federated split learning on Ray."""

from __future__ import annotations

from typing import Any

from .config import Config, load_config
from .errors import RaysageError

__version__ = "0.1.0"


def simulate(config: Config | None = None, **overrides: Any):
    """Run a simulation from a Config and/or field overrides; returns a SimulationResult.

    >>> result = raysage.simulate(clients=10, rounds=2, backend="serial")  # doctest: +SKIP
    >>> result.summary["final_accuracy"]                                   # doctest: +SKIP
    """
    from .engine.orchestrator import simulate as run

    cfg = config.replace(**overrides) if config is not None else load_config(**overrides)
    return run(cfg)


def plan(config: Config | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """Bytes by kind and simulated time of every round of a config, without training."""
    from .engine.orchestrator import plan as dry_run

    cfg = config.replace(**overrides) if config is not None else load_config(**overrides)
    return dry_run(cfg)


__all__ = ["Config", "RaysageError", "load_config", "plan", "simulate", "__version__"]
