"""The training loss of every split model, image classifier or language model.

Targets say which task a batch is: class labels ``(N,)``, or next-token
targets ``(N, T)`` with ``IGNORE`` at positions that carry no loss (the
prompt and the padding of a causal-LM sequence).

For token targets the batch "mean" is the summed token loss divided by the
number of *sequences*, not tokens. Then, exactly as for classification,
mean = sum / len(y), which the algorithms rely on: FSL-SAGE's per-sample
true gradients, SGLR's rescaling and the server's averaging all treat a
sample as the unit. (Per-token losses are what evaluation reports.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysage.lazy import F

if TYPE_CHECKING:
    import torch

IGNORE = -100


def split_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if y.dim() == 1:
        return F.cross_entropy(logits, y, reduction=reduction)
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                            reduction="sum")
    return total / len(y) if reduction == "mean" else total


def count_targets(y: torch.Tensor) -> int:
    """Units the loss is summed over: samples, or target tokens."""
    return len(y) if y.dim() == 1 else int((y != IGNORE).sum())


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Correct argmax predictions over the same units (token accuracy for a language model)."""
    if y.dim() == 1:
        return int((logits.argmax(1) == y).sum())
    keep = y != IGNORE
    return int((logits.argmax(-1)[keep] == y[keep]).sum())
