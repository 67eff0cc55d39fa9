from .writer import RunWriter, atomic_write

__all__ = ["RunWriter", "atomic_write"]
