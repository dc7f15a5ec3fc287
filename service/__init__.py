"""adamscope service: Adam steppers behind a REST API (installed as ``adamscope.service``)."""

from adamscope import __version__

__all__ = ["__version__"]
