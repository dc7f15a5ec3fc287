"""HTTP routes, one module per resource; each handler parses, calls the engine, replies."""

from . import steppers, tensors

__all__ = ["steppers", "tensors"]
