"""An algorithm's own parameters: a strict pydantic section of the config.

A leaf module, so that algorithms declare their parameters without importing
the config (which resolves algorithms by name: the import goes one way).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

OptimizerName = Literal["adam", "adamw", "sgd"]

STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                    coerce_numbers_to_str=True)


class Section(BaseModel):
    """An algorithm's own parameters: subclass it in the algorithm's module.

    ``model_defaults`` gives other defaults for some models (``{"gpt2": {...}}``),
    applied where the user gives no value.
    """

    model_config = STRICT
    model_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
