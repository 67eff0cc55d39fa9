"""Split models: client x_c, server x_s and auxiliary x_a around a cut layer."""

from raysage.models.zoo import (
    MODELS,
    SplitArchitecture,
    get_architecture,
    num_parameters,
    state_bytes,
    summarize,
)

__all__ = [
    "MODELS",
    "SplitArchitecture",
    "get_architecture",
    "num_parameters",
    "state_bytes",
    "summarize",
]
