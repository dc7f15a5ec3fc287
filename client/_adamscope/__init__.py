"""adamscope: host, step, inspect and steer Adam optimizer state.

The package users import. It re-exports the client; the service lives in
``adamscope.service`` (``adamscope serve`` runs it)::

    import adamscope

    opt = adamscope.RemoteAdam(model.named_parameters(), lr=1e-3, url="http://127.0.0.1:8470")
    with adamscope.Client("http://127.0.0.1:8470") as c:
        c.list()

(In the repository this file is ``client/_adamscope/__init__.py``: pyproject.toml maps the
root package here, ``adamscope.client`` to ``client/`` and ``adamscope.service`` to
``service/``.)
"""

from . import client
from .client import *  # noqa: F403 - the client's public names are adamscope's

__version__ = "0.1.0"

__all__ = [*client.__all__, "__version__"]
