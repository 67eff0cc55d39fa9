"""User-facing errors.

Anything the user can fix (a config value, a missing or corrupt file, an
unknown name) raises a subclass of :class:`RaysageError` with a one-line
message saying what was wrong, which value, and what to do. The CLI prints
that line and exits non-zero instead of showing a traceback.
"""


class RaysageError(Exception):
    """A problem the user can fix; the message is shown as-is."""


class ConfigError(RaysageError):
    """A config field holds a value that is not allowed."""


class DataError(RaysageError):
    """A dataset is missing, unreadable, corrupt, or cannot be partitioned."""


class ModelError(RaysageError):
    """An unknown model name or an impossible model configuration."""


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (Ray's and pyarrow's span several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) \
        or type(exc).__name__


class ContractError(RaysageError):
    """An algorithm that does not keep to the contract (raysage.algorithms.base): its
    client_round and its plan disagree, or a hook returned the wrong thing."""
