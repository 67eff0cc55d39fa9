"""Split models: client x_c, server x_s and auxiliary x_a around a cut layer."""

from raysage.models.losses import IGNORE, count_targets, correct_predictions, split_loss
from raysage.models.zoo import (
    MODELS,
    SplitArchitecture,
    frozen_bytes,
    frozen_names,
    get_architecture,
    num_parameters,
    state_bytes,
    summarize,
    transfer_bytes,
    transfer_state,
)

__all__ = [
    "IGNORE",
    "count_targets",
    "correct_predictions",
    "frozen_bytes",
    "frozen_names",
    "split_loss",
    "transfer_bytes",
    "transfer_state",
    "MODELS",
    "SplitArchitecture",
    "get_architecture",
    "num_parameters",
    "state_bytes",
    "summarize",
]
