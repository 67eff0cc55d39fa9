"""A model's state as arrays: what travels, what is kept per client, what is averaged.

Plain numpy arrays cross processes (zero-copy through Ray's object store) and
fill the state stores; these helpers move state between them and torch
modules, count the bytes a process holds, and average states as FedAvg does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..errors import RaysageError
from ..lazy import nn, torch
from ..models import frozen_names, transfer_state
from ..store import StateStore
from .optim import Optimizer

if TYPE_CHECKING:
    from .base import Algorithm, ClientState

State = dict[str, np.ndarray]          # a model's state dict as numpy arrays (zero-copy in Ray)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on the array's memory; read-only arrays (read zero-copy from
    Ray's object store) are copied first, since torch must not share them."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_state(module: nn.Module) -> State:
    """What of a model travels: its state without frozen parameters (a LoRA
    model's base weights are the same everywhere and never change)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in transfer_state(module).items()}


class StateMismatch(RaysageError):
    """Arrays (a checkpoint's, a client's) that do not fit the model they are loaded into."""


def load_state(module: nn.Module, state: State) -> None:
    try:
        missing, unexpected = module.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise StateMismatch(f"state does not fit the model: {str(exc).splitlines()[-1].strip()}"
                            ) from None
    absent = set(missing) - frozen_names(module)
    if unexpected or absent:
        raise StateMismatch(f"state does not fit the model: missing {sorted(absent)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")


def state_nbytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by models (parameters, buffers, gradients), optimizer state and arrays."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in obj)
    if isinstance(obj, StateStore):
        return obj.total_bytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        total = sum(state_nbytes(t, seen) for t in obj.state_dict(keep_vars=True).values())
        return total + sum(state_nbytes(p.grad, seen) for p in obj.parameters()
                           if p.grad is not None)
    if isinstance(obj, Optimizer):
        return obj.nbytes()
    return 0


def release_gradients(obj: Any) -> None:
    """Drop the gradients of every model in obj: between rounds they are dead weight,
    and a checkpoint does not keep them, so state is the same restored or not."""
    if isinstance(obj, dict):
        for value in obj.values():
            release_gradients(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            release_gradients(value)
    elif isinstance(obj, nn.Module):
        obj.zero_grad(set_to_none=True)



class WeightedAverage:
    """FedAvg of whole states (parameters and buffers), added one client at a time.

    Clients are added in id order so that the floating-point sum, and hence
    the result, is the same whatever worker computed each state; only one
    state needs to be in memory at a time. Sums run in float64 and are cast
    back to each entry's dtype (integer buffers such as BatchNorm's
    num_batches_tracked are rounded).
    """

    def __init__(self):
        self.sums: dict[str, np.ndarray] | None = None
        self.dtypes: dict[str, np.dtype] = {}

    def add(self, weight: float, state: State) -> None:
        if self.sums is None:
            self.sums = {name: np.zeros(arr.shape, np.float64) for name, arr in state.items()}
            self.dtypes = {name: arr.dtype for name, arr in state.items()}
        for name, acc in self.sums.items():
            acc += weight * state[name]

    def result(self) -> State:
        out = {}
        for name, acc in self.sums.items():
            dtype = self.dtypes[name]
            # (np.rint of a 0-d array is a scalar; asarray keeps every entry an array.)
            out[name] = np.asarray(np.rint(acc) if np.issubdtype(dtype, np.integer)
                                   else acc).astype(dtype)
        return out


def weighted_average(weighted_states: Iterable[tuple[float, State]]) -> State:
    average = WeightedAverage()
    for weight, state in weighted_states:
        average.add(weight, state)
    return average.result()


# ------------------------------------------------------------- kept state

def save_kept(algo: "Algorithm", client: "ClientState") -> State:
    """The client's kept state (see Keeps) as one flat mapping of arrays."""
    keeps = algo.client_keeps
    out: State = {}
    for name in keeps.models:
        out.update({f"model.{name}.{k}": v for k, v in to_state(client.models[name]).items()})
    for name in keeps.optimizers:
        out.update({f"optimizer.{name}.{k}": v
                    for k, v in client.optimizers[name].state_arrays().items()})
    for name in keeps.tensors:
        out[f"tensor.{name}"] = client.tensors[name].detach().cpu().numpy().copy()
    return out


def load_kept(algo: "Algorithm", client: "ClientState", state: State | None) -> None:
    """Load a client's kept state into the working set; None: its first round."""
    keeps = algo.client_keeps
    if state is None:
        fresh = algo.fresh_client_models(client.cid) if keeps.models else {}
        for name in keeps.models:
            client.models[name].load_state_dict(fresh[name].state_dict())
        for name in keeps.optimizers:
            client.optimizers[name].load_state_arrays(None)
        tensors = algo.fresh_client_tensors(client.cid) if keeps.tensors else {}
        client.tensors = {name: tensors[name].to(algo.device) for name in keeps.tensors}
        return
    for name in keeps.models:
        prefix = f"model.{name}."
        load_state(client.models[name], {k[len(prefix):]: v for k, v in state.items()
                                         if k.startswith(prefix)})
    for name in keeps.optimizers:
        prefix = f"optimizer.{name}."
        client.optimizers[name].load_state_arrays(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    # (A copy: the store's arrays must not change when the client's tensors do.)
    client.tensors = {name: torch.from_numpy(np.array(state[f"tensor.{name}"])).to(algo.device)
                      for name in keeps.tensors}
