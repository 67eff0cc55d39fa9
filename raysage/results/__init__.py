from .writer import RunFolder, RunWriter, atomic_write

__all__ = ["RunFolder", "RunWriter", "atomic_write"]
