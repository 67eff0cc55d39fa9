"""What an observer of a client's link could learn: leakage measured beside training.

Three measures, each an observer (no simulated bytes or time, no random draw
from training's streams, no model touched), on a seeded sample of a client's
uploads in each round (``leakage_uploads`` of them):

* **Input leakage**, distance correlation between the inputs of a batch and
  the smashed data the server receives for it (Székely et al. 2007; the
  measure NoPeek minimises, Vepakomma et al. 2019). 0 means independent, 1
  means one is a similarity transform of the other. It stands in for the
  mutual information the SGLR paper reports: estimators of mutual
  information (k-nearest-neighbour ones such as Kraskov's, or MINE's trained
  critic) need far more samples than dimensions to be trustworthy, and a
  batch here is 20 to 128 samples of 3,072 input and 2,048 or more smashed
  dimensions. Distance correlation is defined for any dimensions and its
  sample estimate is exact arithmetic on two distance matrices. Its sample
  value is biased upward for small n (independent batches of 20 read about
  0.3), so compare algorithms at equal batch size.
* **Label leakage**, the accuracy of a clustering attack (after Li et al.,
  "Label Leakage and Protection in Two-party Split Learning", ICLR 2022): the
  per-sample rows of what crosses the link (the cut-layer gradients a client
  receives, and the smashed data it sends) are clustered into as many
  clusters as there are labels, and each cluster is matched to one label so
  that as many samples as possible are right. Chance is well above
  1/labels because the matching is chosen after the fact (random clusters of
  a batch of 10 balanced classes score about 0.46 at 20 samples, 0.23 at
  128), and higher under label skew; 1 means the rows reveal every label. The attacker needs no
  label; the labels are used only to score it. (In every algorithm here the
  labels also travel to the server in the clear, so this is what someone on
  the link without them, or a variant that kept them private, would leak.)
* **Model inversion** (optional, ``--inversion true``): at the end of a run,
  a decoder trained on public data (the first half of the test split) to
  invert the final client model, scored by its reconstruction error on the
  second half relative to predicting the mean image (1: nothing recovered).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .lazy import torch
from .streams import stream_seed


def leakage_metrics():
    """The columns of the leakage observer, for every algorithm (NaN where nothing of
    the kind crosses the link, or with --leakage-uploads 0)."""
    from .algorithms.base import Metric

    return (Metric("leak_input_dcor", "distance correlation of a batch's inputs with its "
                   "smashed data, per measured upload", count="leakage_uploads"),
            Metric("leak_label_smashed", "accuracy of a clustering attack on the labels of "
                   "the smashed data a client sent", per_round="client_mean"),
            Metric("leak_label_grad", "accuracy of a clustering attack on the labels of "
                   "the cut-layer gradients a client received", per_round="client_mean"))


def distance_correlation(x, y) -> float:
    """Sample distance correlation of paired rows of x and y (Székely et al. 2007)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(len(x), -1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(len(y), -1)

    def centred(rows):
        d = torch.cdist(rows, rows)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    dcov2, dvar_x, dvar_y = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if dvar_x <= 0 or dvar_y <= 0:
        return 0.0
    return float(torch.sqrt(torch.clamp(dcov2, min=0) / torch.sqrt(dvar_x * dvar_y)))


RESTARTS = 10


def cluster_attack(rows, labels, seed: int) -> float:
    """Accuracy of labelling rows by k-means clusters (k = the labels present, on
    unit-length rows), each cluster matched to one label at best (Hungarian)."""
    from scipy.cluster.vq import kmeans2
    from scipy.optimize import linear_sum_assignment

    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        return math.nan
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = rows / np.where(norms > 0, norms, 1.0)
    # Identical rows cannot be told apart: no more clusters than distinct rows.
    k = min(len(classes), len({row.tobytes() for row in unit}))
    if unit.shape[1] > len(unit):
        # k-means sees rows only through distances to means of rows, which any
        # coordinates with the same inner products keep: n x n from the Gram
        # matrix instead of n x d (40 rows of 4,096 smashed values: 100x less work).
        # In torch, on the process's torch threads: numpy's BLAS starts a thread per
        # core, which on a busy machine made this product 100x slower.
        rows_t = torch.from_numpy(unit)
        values, vectors = torch.linalg.eigh(rows_t @ rows_t.T)
        unit = (vectors * values.clamp_min(0.0).sqrt()).numpy()
    assigned = np.zeros(len(unit), dtype=int)
    if k > 1:
        # The attacker keeps the tightest of several k-means++ starts (its own
        # criterion, no labels), as k-means is usually run.
        best = math.inf
        with warnings.catch_warnings():      # an emptied cluster is the attack's loss
            warnings.simplefilter("ignore")
            for start in range(RESTARTS):
                centres, labels_k = kmeans2(unit, k, minit="++", seed=seed + start, iter=30)
                inertia = float(((unit - centres[labels_k]) ** 2).sum())
                if inertia < best:
                    best, assigned = inertia, labels_k
    counts = np.zeros((k, len(classes)))
    for c, label in zip(assigned, np.searchsorted(classes, labels)):
        counts[c, label] += 1
    matched_rows, matched_cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[matched_rows, matched_cols].sum() / len(labels))


def sampled_uploads(seed: int, cid: int, rnd: int, uploads: list[int], count: int) -> set[int]:
    """The iterations whose uploads are measured: a seeded sample of the planned ones."""
    if count <= 0 or not uploads:
        return set()
    if count >= len(uploads):
        return set(uploads)
    rng = np.random.default_rng(stream_seed(seed, "leakage", cid, rnd))
    return {uploads[i] for i in rng.choice(len(uploads), size=count, replace=False)}


@dataclass
class LeakageProbe:
    """One client's round: the sampled uploads' inputs, smashed rows and gradients."""

    seed: int
    cid: int
    rnd: int
    measured: set[int]
    dcor: list[float] = field(default_factory=list)
    smashed: list[np.ndarray] = field(default_factory=list)
    smashed_labels: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)
    grad_labels: list[np.ndarray] = field(default_factory=list)
    shapes: dict[int, tuple] = field(default_factory=dict)
    labels: dict[int, np.ndarray] = field(default_factory=dict)

    def upload(self, k: int, x, y, arrays: dict[str, Any]) -> None:
        smashed = arrays.get("smashed")
        if k not in self.measured or smashed is None:
            return
        y = _numpy(y)
        if np.issubdtype(_numpy(x).dtype, np.floating):      # images, not token ids
            self.dcor.append(distance_correlation(_numpy(x), smashed))
        if y.ndim == 1:                                      # class labels
            self.smashed.append(np.asarray(smashed))
            self.smashed_labels.append(y)
            self.shapes[k], self.labels[k] = np.shape(smashed), y

    def reply(self, k: int, reply: Any) -> None:
        """A reply of the smashed data's shape is its cut-layer gradient."""
        if k in self.shapes and isinstance(reply, np.ndarray) and reply.shape == self.shapes[k]:
            self.grads.append(reply)
            self.grad_labels.append(self.labels[k])

    def metrics(self) -> dict[str, list[float]]:
        """Sums for the client's metrics: name -> [weighted sum, weight]."""
        out: dict[str, list[float]] = {}
        if self.dcor:
            out["leak_input_dcor"] = [sum(self.dcor), float(len(self.dcor))]
        seed = stream_seed(self.seed, "leakage-attack", self.cid, self.rnd) % 2**31
        for name, rows, labels in (("leak_label_smashed", self.smashed, self.smashed_labels),
                                   ("leak_label_grad", self.grads, self.grad_labels)):
            if rows:
                accuracy = cluster_attack(np.concatenate(rows), np.concatenate(labels), seed)
                if not math.isnan(accuracy):
                    out[name] = [accuracy, 1.0]
        return out


def _numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()


# ------------------------------------------------------------ model inversion

def inversion_attack(client_model, x_public, x_private, *, epochs: int, seed: int,
                     batch_size: int = 64, device="cpu") -> dict[str, float]:
    """Train a decoder from smashed data back to inputs on public data; its mean squared
    error on private data, and that error over the error of predicting the mean input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        client_model.eval()
        with torch.no_grad():
            h_public = torch.cat([client_model(x_public[i:i + 256].to(device)).flatten(1).cpu()
                                  for i in range(0, len(x_public), 256)])
            h_private = torch.cat([client_model(x_private[i:i + 256].to(device)).flatten(1).cpu()
                                   for i in range(0, len(x_private), 256)])
        client_model.train()
        target_public = x_public.flatten(1)
        target_private = x_private.flatten(1)
        width = 1024
        decoder = torch.nn.Sequential(torch.nn.Linear(h_public.shape[1], width), torch.nn.ReLU(),
                                      torch.nn.Linear(width, target_public.shape[1]))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(len(h_public), generator=order).split(batch_size):
                loss = torch.nn.functional.mse_loss(decoder(h_public[batch]),
                                                    target_public[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            mse = float(torch.nn.functional.mse_loss(decoder(h_private), target_private))
            baseline = float(((target_private - target_public.mean(0)) ** 2).mean())
    return {"inversion_mse": mse, "inversion_relative": mse / baseline if baseline else math.nan}
