"""adamscope client: sync and async clients, and drop-in remote Adam optimizers.

>>> from adamscope.client import Client, AsyncClient, RemoteAdam, RemoteAdamW
"""

from ._base import StepReply
from .aio import AsyncClient
from .errors import AdamscopeError, APIStatusError, TransportError
from .optim import RemoteAdam, RemoteAdamW, RemoteOptimizerMismatch
from .sync import Client
from .watching import Watch, watch

__all__ = [
    "APIStatusError",
    "AdamscopeError",
    "AsyncClient",
    "Client",
    "RemoteAdam",
    "RemoteAdamW",
    "RemoteOptimizerMismatch",
    "StepReply",
    "TransportError",
    "Watch",
    "watch",
]
