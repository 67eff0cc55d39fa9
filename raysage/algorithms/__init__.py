"""The simulated algorithms: one module each, plain torch, no Ray."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Algorithm, ClientState, ModelSizes, ServerState
from .fedavg import FedAvg
from .fsl_sage import FSLSage

ALGORITHMS: dict[str, type[Algorithm]] = {
    FSLSage.name: FSLSage,
    FedAvg.name: FedAvg,
}


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm '{name}'; choose one of: "
                          + ", ".join(ALGORITHMS)) from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientState", "ModelSizes", "ServerState",
           "algorithm_class"]
