"""torch, imported where it is first used rather than where it is named.

The driver of a run plans rounds, averages arrays and writes Parquet; it
uses the algorithm classes for their schedules but never runs a tensor.
Importing torch costs every process about 200 MB of private memory, which
on a laptop is as much as a client worker's whole state, so the modules the
driver imports (algorithms, runtime, losses, transforms) name torch through
these stand-ins: the first attribute read (``torch.cat``, ``nn.Linear``)
imports the real module, in a worker or the server, and from then on each
read is one dictionary lookup more than a plain import.

Code that imports torch the ordinary way still works everywhere: it only
costs the driver that memory. Modules that subclass ``nn.Module`` at import
time (the model zoo) import torch directly; the driver does not import them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r}, {state}>"


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
