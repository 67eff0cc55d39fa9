"""Split models: client x_c, server x_s and auxiliary x_a around a cut layer.

The model zoo defines ``nn.Module`` classes, which needs torch at import
time; it is loaded on first use of one of its names, so the driver, which
never builds a model, does not import torch (see :mod:`raysage.lazy`).
"""

from raysage.models.losses import IGNORE, correct_predictions, count_targets, split_loss
from raysage.models.state import (frozen_bytes, frozen_names, num_parameters, state_bytes,
                                  transfer_bytes, transfer_state)

_ZOO = ("MODELS", "SplitArchitecture", "architecture", "get_architecture", "summarize")


def __getattr__(name: str):
    if name in _ZOO:
        from raysage.models import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'raysage.models' has no attribute {name!r}")


__all__ = ["IGNORE", "MODELS", "SplitArchitecture", "architecture", "correct_predictions",
           "count_targets", "frozen_bytes", "frozen_names", "get_architecture",
           "num_parameters", "split_loss", "state_bytes", "summarize", "transfer_bytes",
           "transfer_state"]
