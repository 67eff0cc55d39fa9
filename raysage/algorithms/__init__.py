"""The simulated algorithms: one module each, plain torch, no Ray.

``--algorithm`` takes a built-in name, or a user's class: ``path/to/file.py:Class``
(a file anywhere) or ``package.module:Class`` (an importable module).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import ConfigError
from .base import Algorithm, ClientState, Keeps, ModelSizes, ServerState, Setup, check_contract
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
_LOADED: dict[str, type[Algorithm]] = {}


def algorithm_class(name: str) -> type[Algorithm]:
    """The class behind an --algorithm value: a built-in name, file.py:Class or module:Class."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if name in _LOADED:
        return _LOADED[name]
    where, colon, attr = str(name).rpartition(":")
    if not colon or not where or not attr:
        raise ConfigError(f"config field 'algorithm' = '{name}' is not an algorithm; choose "
                          "one of: " + ", ".join(ALGORITHMS) + ", or give your own as "
                          "path/to/file.py:Class or package.module:Class")
    module = _load_file(where, name) if where.endswith(".py") else _import(where, name)
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"algorithm '{name}': {where} has no '{attr}'")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm '{name}': {attr} is not a subclass of "
                          "raysage.algorithms.base.Algorithm")
    for attribute in ("name", "label", "description"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise ConfigError(f"algorithm '{name}': {attr} needs a class attribute "
                              f"'{attribute}' (a string)")
    if cls.name in ALGORITHMS:
        raise ConfigError(f"algorithm '{name}': its name '{cls.name}' is a built-in "
                          "algorithm's; give it a name of its own")
    check_contract(cls)
    _LOADED[name] = cls
    return cls


def _load_file(path: str, name: str):
    """Import a user's algorithm file as a module of its own.

    Its classes are pickled by value (by cloudpickle, which Ray uses), so workers
    on other nodes run it without the file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"algorithm '{name}': no file {file}; give the path of a Python "
                          "file, relative to where you run raysage or absolute")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"raysage_user_algorithm_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"algorithm '{name}': importing {file} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    for pickler in ("ray.cloudpickle", "cloudpickle"):     # Ray's own copy, and the package
        try:
            importlib.import_module(pickler).register_pickle_by_value(module)
        except ImportError:    # not installed: it pickles nothing here
            pass
    return module


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"algorithm '{name}': cannot import module '{module}' ({exc}); "
                          "install it or give path/to/file.py:Class") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientState", "Keeps", "ModelSizes", "ServerState",
           "Setup", "algorithm_class"]
