"""The browser dashboard: static files (HTML, plain JavaScript, CSS) under ``static/``.

They use only the public REST and SSE API, load nothing from other origins (no CDN, no
build step) and so work offline; :mod:`adamscope.service.api.routes.dashboard` serves them.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

__all__ = ["static"]


def static() -> Traversable:
    """The folder of the dashboard's files, inside the installed package."""
    return files(__name__) / "static"
