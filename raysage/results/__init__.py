from .writer import RunFolder, RunWriter

__all__ = ["RunFolder", "RunWriter"]
