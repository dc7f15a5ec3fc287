"""One slot's service, inside a Ray actor.

A :class:`SlotHost` runs the single-process adamscope app (:func:`adamscope.service.app.create_app`)
under uvicorn on a thread of its actor, on an ephemeral port of its node's address, with
the slot's own data directory (``<data dir>/hosts/slot-<k>``). Everything the service does
for a stepper (steps, reads, persistence, signals, history, events) is that unchanged
code; the ingress forwards HTTP requests to it. Starting the app restores every stepper
the slot's directory holds, so a replacement actor for a dead one's slot comes up with the
dead one's steppers at their last written state.

The class is plain Python: :func:`host_actor_class` wraps it with ``ray.remote``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["SlotHost", "host_actor_class", "slot_dir"]


def slot_dir(data_dir: str | Path, slot: int) -> Path:
    return Path(data_dir) / "hosts" / f"slot-{slot}"


class SlotHost:
    """The service for slot ``slot``; ``settings`` are the service's settings as JSON
    (the data directory is the cluster's; the host and port are this actor's)."""

    def __init__(self, slot: int, settings: dict[str, Any], bind: str) -> None:
        import uvicorn

        from ..app import create_app
        from ..settings import Settings

        self.slot = slot
        if bind == "auto":
            import ray

            bind = ray.util.get_node_ip_address()
        base = Settings(**settings)
        self.settings = base.model_copy(
            update={"data_dir": slot_dir(base.data_dir, slot), "host": bind, "port": 0}
        )
        self.app = create_app(self.settings)
        sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, 0))
        self.port = int(sock.getsockname()[1])
        self.bind = bind
        config = uvicorn.Config(
            self.app, log_level=self.settings.log_level, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [sock]},
            name=f"adamscope-slot-{slot}",
            daemon=True,
        )
        self.thread.start()

    def wait_started(self, timeout: float = 600.0) -> bool:
        """Return once the service serves (restoring a large slot from disk takes a while);
        raises when it failed or did not start in ``timeout`` seconds. The constructor
        returns before this, so that the cluster can tell an actor Ray could not place
        from a service that is slow to start."""
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"slot {self.slot}: the service did not start")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"slot {self.slot}: the service did not start in {timeout:.0f} s"
                )
            time.sleep(0.02)
        return True

    def info(self) -> dict[str, Any]:
        """Where this slot's service listens and what it runs on."""
        import torch

        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        device = self.settings.default_device()
        free = total = None
        if device.startswith("cuda") and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(torch.device(device))
        import ray

        return {
            "slot": self.slot,
            "url": f"http://{host}:{self.port}",
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": self.bind,
            "device": device,
            "device_free_bytes": free,
            "device_total_bytes": total,
            "budget_bytes": self.settings.memory_budget_bytes,
        }

    def steppers(self) -> dict[str, dict[str, Any]]:
        """The steppers this slot holds: name -> parameter names, their footprint total
        (what the memory budget counts) and the part of it on the device."""
        registry = getattr(self.app.state, "registry", None)
        out: dict[str, dict[str, Any]] = {}
        for s in registry.list() if registry is not None else []:
            fp = s.footprint()
            out[s.name] = {"params": list(s.names), "bytes": fp.total, "device_bytes": fp.on_device}
        return out

    def ping(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop serving (writes what the durability policies still owe)."""
        self.server.should_exit = True
        self.thread.join(timeout=30)


def host_actor_class(num_cpus: float, num_gpus: float) -> Any:
    """:class:`SlotHost` as a Ray actor class with these resources per actor."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(SlotHost)
