"""The simulated algorithms: one module each, plain torch, no Ray."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Algorithm, ClientState, Keeps, ModelSizes, ServerState, Setup
from .cse_fsl import CSEFSL
from .fedavg import FedAvg
from .fsl_an import FSLAN
from .fsl_sage import FSLSage
from .sglr import SGLR
from .sl import SplitLearning
from .splitfed_v1 import SplitFedV1
from .splitfed_v2 import SplitFedV2

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (FSLSage, FedAvg, SplitLearning, SplitFedV1, SplitFedV2, FSLAN, CSEFSL, SGLR)
}


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm '{name}'; choose one of: "
                          + ", ".join(ALGORITHMS)) from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientState", "Keeps", "ModelSizes", "ServerState",
           "Setup", "algorithm_class"]
