"""``adamscope serve --ray``: the ingress on Ray Serve, the slots as Ray actors.

:func:`run` connects to a Ray cluster (a new local one by default), starts Serve's HTTP
proxy on the given host and port, deploys the ingress (one replica: it owns the slots'
actors and the sharded steppers' locks), waits until it answers ``/healthz``, and serves
until SIGINT/SIGTERM; then it stops the slots (each writes what its durability policy
still owes) and shuts Serve down.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from typing import Any

import httpx

from .cluster import ClusterConfig
from .resources import SlotResourceError, slot_request

__all__ = ["deployment", "resolved", "run"]

log = logging.getLogger("adamscope.distributed")

#: The resource Ray gives the head node (and no other).
HEAD_NODE = "node:__internal_head__"


def resolved(config: ClusterConfig, cluster: dict[str, float]) -> ClusterConfig:
    """``config`` with its slot count and each slot's resources resolved for a cluster
    with ``cluster``'s resources; raises :class:`SlotResourceError` when Ray could never
    place them all."""
    want = slot_request(config.slots, config.num_gpus, config.num_cpus, cluster)
    log.info(
        "distributed: %d slots of %g GPU / %g CPU each", want.slots, want.num_gpus, want.num_cpus
    )
    return dataclasses.replace(
        config, slots=want.slots, num_gpus=want.num_gpus, num_cpus=want.num_cpus
    )


def deployment(config: ClusterConfig, resolve: bool = False) -> Any:
    """The ingress as a bound Serve application (with ``resolve``, the slots' resources
    are resolved against the cluster's when its replica starts: a Serve config file's)."""
    from ray import serve

    @serve.deployment(
        name="adamscope",
        num_replicas=1,
        max_ongoing_requests=1024,
        # On the head node, with Serve's controller and proxy: the ingress owns the slot
        # actors, so a worker node lost never takes the ingress (and every slot) with it.
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
        graceful_shutdown_timeout_s=60,
        health_check_period_s=5,
    )
    @serve.ingress()
    class AdamscopeIngress:
        def __init__(self, cfg: dict[str, Any], resolve: bool) -> None:
            import ray

            self.config = ClusterConfig(**cfg)
            if resolve:
                self.config = resolved(self.config, ray.cluster_resources())
            self.ingress: Any = None

        def __serve_build_asgi_app__(self) -> Any:
            from .app import build_app

            app, self.ingress = build_app(self.config)
            return app

        async def stop_slots(self) -> None:
            if self.ingress is not None:
                await self.ingress.stop()

    return AdamscopeIngress.bind(  # type: ignore[attr-defined]
        dataclasses.asdict(config), resolve
    )


def _ready(url: str, timeout: float) -> list[dict[str, Any]] | None:
    """The slots, once the ingress at ``url`` answers ``/healthz`` (the first request
    starts them); None, having said why, when they did not start or not in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/healthz", timeout=timeout)
            if r.status_code == 200:
                return list(r.json()["slots"])
            if r.status_code == 503 and r.json().get("status") == "failed":
                print(
                    f"adamscope: error: the slots did not start: {r.json().get('error')}",
                    file=sys.stderr,
                    flush=True,
                )
                return None
        except (httpx.TransportError, ValueError):
            pass
        if time.monotonic() > deadline:
            log.error("the distributed service did not become ready in time")
            return None
        time.sleep(0.2)


def run(
    config: ClusterConfig,
    host: str,
    port: int,
    address: str | None = None,
    ready_timeout: float = 300.0,
) -> int:
    import ray
    from ray import serve

    init: dict[str, Any] = {
        "namespace": config.namespace,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    # Without an address, a new local instance: never attach to one already running here
    # (ray.init's default), whose Serve would keep its own HTTP port.
    init["address"] = address or "local"
    ray.init(**init)
    try:
        try:
            config = resolved(config, ray.cluster_resources())
        except SlotResourceError as e:
            print(f"adamscope: error: {e}", file=sys.stderr, flush=True)
            return 2
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port},
            logging_config={"log_level": "WARNING"},
        )
        try:
            handle = serve.run(deployment(config), name="adamscope", route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a slot that could not start, said once
            print(
                f"adamscope: error: the distributed service did not start: {e}",
                file=sys.stderr,
                flush=True,
            )
            serve.shutdown()
            return 1
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        slots = _ready(url, ready_timeout)
        if slots is None:
            serve.shutdown()
            return 1
        print(
            f"adamscope (Ray) serving on http://{host}:{port}: {len(slots)} slots: "
            + ", ".join(f"{s['slot']}@{s['node']} pid {s['pid']} {s['device']}" for s in slots),
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        try:
            handle.stop_slots.remote().result(timeout_s=120)
        except Exception:  # noqa: BLE001 - shutting down regardless
            log.exception("stopping the slots failed")
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()
