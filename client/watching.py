"""Watch an optimizer that stays where it is: ``adamscope.watch(opt, model=..., url=...)``.

The optimizer keeps training in the user's job; the service shows it as a stepper of kind
``watched``. After every ``every``-th step the trainer computes the per-tensor signals on
its own device, with the service's own signal kernels (found through the
``adamscope.watch_probes`` entry point, or installed with :func:`set_probe_factory`: the
client never imports the service), and queues those small results for a background sender
(:mod:`._watch_sender`). Nothing here raises into training, does network I/O on the
training thread, or waits for the service.

Commands the service queues for the run (option changes, state reads, state loads) are
applied by the training thread between two steps, each exactly once (the applied ids are
remembered, and acknowledged with the step at which they applied)::

    import adamscope, torch

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with adamscope.watch(opt, model=model, url="http://127.0.0.1:8470", name="run-1") as run:
        ...  # train as usual; run.log(loss=...) sends scalars with the next report
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol

import httpx
import torch

from ._base import authorize, resolve_url
from ._watch_commands import apply_command
from ._watch_dist import SHARDED, LocalView, Topology, placement, topology
from ._watch_sender import Counters, Sender

__all__ = ["Probe", "Watch", "set_probe_factory", "watch"]

log = logging.getLogger("adamscope.watch")


class Probe(Protocol):
    """Computes one step's signals: ``before`` in the step's pre-hook, ``after`` in its
    post-hook (returns a callable that finishes the work off the training thread)."""

    def before(self, opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> None: ...

    def after(self, step: int) -> Callable[[], dict[str, Any]] | None: ...

    def tick(self, opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> None: ...


_probe_factory: Callable[[], Probe] | None = None


def set_probe_factory(factory: Callable[[], Probe]) -> None:
    """Install what computes the signals (by default: the ``adamscope.watch_probes`` entry
    point, the service's kernels)."""
    global _probe_factory
    _probe_factory = factory


def _new_probe() -> Probe | None:
    """A probe from the installed factory, else the first entry point that loads; None
    (steps reported without signals) when there is none."""
    if _probe_factory is not None:
        return _probe_factory()
    for ep in importlib.metadata.entry_points(group="adamscope.watch_probes"):
        try:
            factory: Callable[[], Probe] = ep.load()
            return factory()
        except Exception:  # noqa: BLE001 - a broken plugin must not stop training
            log.exception("adamscope.watch_probes entry point %r failed to load", ep.name)
    return None


def _param_names(
    opt: torch.optim.Optimizer, model: torch.nn.Module | None, names: Iterable[str] | None
) -> dict[torch.Tensor, str]:
    params = [p for g in opt.param_groups for p in g["params"]]
    if names is not None:
        listed = list(names)
        if len(listed) != len(params):
            raise ValueError(f"names: {len(listed)} given for {len(params)} parameters")
        return dict(zip(params, listed, strict=True))
    if model is not None:
        by_id = {id(p): n for n, p in model.named_parameters()}
        if all(id(p) in by_id for p in params):
            return {p: by_id[id(p)] for p in params}
    found = [n for g in opt.param_groups for n in g.get("param_names", [])]
    if len(found) == len(params):
        return dict(zip(params, found, strict=True))
    return {p: f"param{i}" for i, p in enumerate(params)}


class Watch:
    """The handle :func:`watch` returns: a context manager; see the module docstring."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        name: str,
        http: httpx.Client,
        names: Mapping[torch.Tensor, str],
        every: int = 1,
        queue_size: int = 64,
        probe: Probe | None = None,
        owns_http: bool = False,
        topo: Topology | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.optimizer, self.name, self.every = optimizer, name, every
        self.names = dict(names)
        self.counters = Counters()
        #: Steps taken since watch() (the step a report and an acknowledgement name).
        self.step = _initial_step(optimizer)
        self._http, self._owns_http = http, owns_http
        #: This rank's place in a torch.distributed job (see :mod:`._watch_dist`).
        self.topology = topo or Topology()
        self._probe = probe if self.topology.reports_signals else None
        self._view: LocalView | None = None  # a sharded job's local shards, for the probe
        self._view_for = -1  # the step boundary whose gradients the view holds
        self._layout = self._params_json()
        #: (step, name, value) logged since the last report (a tensor is read by the sender).
        self._scalars: list[tuple[int, str, float | torch.Tensor]] = []
        self._inbox: list[dict[str, Any]] = []
        self._inbox_lock = threading.Lock()
        self._finishing: Callable[[], dict[str, Any]] | None = None
        self._worker: threading.Thread | None = None
        self._kind = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "adam"
        self._sender = Sender(http, name, self.counters, self._receive, queue_size)
        self._sender.start()
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        self._closed = False
        self._report(None)  # the run appears before its first step

    # ------------------------------------------------------------ user API

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Scalars (``loss=...``) sent with the next report. A tensor is read by the
        sender, not here (no device sync on the training thread)."""
        with self._inbox_lock:
            for k, v in scalars.items():
                value = v.detach() if isinstance(v, torch.Tensor) else float(v)
                self._scalars.append((self.step, k, value))

    def settle(self) -> None:
        """Wait until the last step's signals are computed (they are computed off the
        training thread while it goes on; the next step waits for them by itself)."""
        self._join_worker()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued report has been sent (or dropped)."""
        self._join_worker()
        if self._scalars:
            self._report(None)
        return self._sender.drain(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Unhook the optimizer and send what is queued (for up to ``timeout`` s)."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._join_worker()
        if self._scalars:
            self._report(None)
        self._sender.close(timeout)
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def sent(self) -> int:
        return self.counters.sent

    @property
    def dropped(self) -> int:
        return self.counters.dropped

    # ------------------------------------------------------------ hooks (training thread)

    def _pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._join_worker()  # the last step's signals read the state: done first
            self._apply_inbox()
            if self._probe is not None and (self.step + 1) % self.every == 0:
                self._probe.before(*self._seen(opt))
        except Exception as e:  # noqa: BLE001 - never raise into training
            self._error(e)

    def _post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        try:
            if self._probe is not None:
                self._probe.tick(*self._seen(opt, fresh=self._view_for != self.step - 1))
                if self.step % self.every and self._view is not None:
                    self._view.release()  # no signals this step: its gradients are not kept
            if self.step % self.every:
                return
            finish = self._probe.after(self.step) if self._probe is not None else None
            if finish is None:
                self._report(None)
                return
            self._finishing = finish
            self._worker = threading.Thread(target=self._finish, daemon=True)
            self._worker.start()
        except Exception as e:  # noqa: BLE001 - never raise into training
            self._error(e)

    def _finish(self) -> None:
        finish, self._finishing = self._finishing, None
        try:
            self._report(finish() if finish is not None else None)
        except Exception as e:  # noqa: BLE001
            self._error(e)

    def _seen(
        self, opt: torch.optim.Optimizer, fresh: bool = True
    ) -> tuple[Any, Mapping[torch.Tensor, str]]:
        """The optimizer as the probe sees it: itself, or on a sharded job's rank its
        local shards (with this step's gradients: ``fresh``, in the pre-hook)."""
        if self.topology.layout != SHARDED:
            return opt, self.names
        if fresh or self._view is None:
            if self._view is not None:
                self._view.release()
            self._view, self._view_for = LocalView(opt, self.names), self.step
        return self._view, self._view.names

    def _join_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join()
        if self._view is not None and worker is not None:
            self._view.release()  # the gradients' shards are not kept past their step

    def _report(self, signals: dict[str, Any] | None) -> None:
        with self._inbox_lock:
            scalars, self._scalars = self._scalars, []
        report = {
            "optimizer": self._kind,
            "step": self.step,
            "params": self._layout,
            "groups": [_group_json(g, self.names) for g in self.optimizer.param_groups],
            "signals": signals,
            "scalars": [{"step": t, "name": k, "value": float(v)} for t, k, v in scalars],
        }
        if self.topology.distributed:
            report.update(self.topology.wire())
        self._sender.put(report)

    def _params_json(self) -> list[dict[str, Any]]:
        """The layout: each parameter's name, (whole) shape, dtype and, on a sharded job,
        where this rank's shard sits (``shard``: offset and local shape)."""
        out = []
        for p, n in self.names.items():
            entry: dict[str, Any] = {
                "name": n,
                "shape": list(p.shape),
                "dtype": str(p.dtype).split(".")[-1],
            }
            where = placement(p) if self.topology.layout == SHARDED else None
            if where is not None:
                entry["shard"] = where
            out.append(entry)
        return out

    # ------------------------------------------------------------ commands

    def _receive(self, commands: list[dict[str, Any]]) -> None:
        with self._inbox_lock:
            known = {c["id"] for c in self._inbox}
            self._inbox.extend(c for c in commands if c["id"] not in known)

    def _apply_inbox(self) -> None:
        if not self._inbox:
            return
        with self._inbox_lock:
            # A command with an apply step ``at`` (a distributed run's: every rank applies
            # it at that boundary) waits for it; one received after it is acknowledged as
            # missed, not applied late (the ranks would differ).
            todo = [c for c in self._inbox if not _later(c, self.step)]
            self._inbox = [c for c in self._inbox if _later(c, self.step)]
        for c in todo:
            if c["id"] in self.counters.acked:
                continue  # applied before a reconnect: acknowledged again, not reapplied
            at = c.get("at")
            if isinstance(at, int) and at < self.step:
                ack = {
                    "id": c["id"],
                    "op": c.get("op"),
                    "step": self.step,
                    "ok": False,
                    "missed": True,
                    "rank": self.topology.rank,
                    "detail": f"missed: due at step {at}, received at step {self.step}",
                }
            else:
                ack = apply_command(
                    self.optimizer, self.names, c, self.step, self._sender, self.topology
                )
            self.counters.acked[c["id"]] = ack
            self.counters.applied += 1
            if not ack["ok"]:
                self.counters.last_error = ack["detail"]

    def _error(self, e: Exception) -> None:
        self.counters.errors += 1
        self.counters.last_error = f"{type(e).__name__}: {e}"
        if self.counters.errors == 1 or self.counters.errors % 1000 == 0:
            log.exception("watch %r (%d errors so far)", self.name, self.counters.errors)


def _later(command: Mapping[str, Any], step: int) -> bool:
    at = command.get("at")
    return isinstance(at, int) and at > step


def _initial_step(opt: torch.optim.Optimizer) -> int:
    for s in opt.state.values():
        if "step" in s:
            return int(float(s["step"]))
    return 0


def _group_json(group: Mapping[str, Any], names: Mapping[torch.Tensor, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"params": [names[p] for p in group["params"]]}
    for k in ("lr", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused"):
        if k in group:
            v = group[k]
            out[k] = float(v) if torch.is_tensor(v) else v
    out["betas"] = [float(b) for b in group["betas"]]
    return out


def watch(
    optimizer: torch.optim.Optimizer,
    *,
    url: str | None = None,
    name: str | None = None,
    model: torch.nn.Module | None = None,
    token: str | None = None,
    every: int = 1,
    names: Iterable[str] | None = None,
    queue_size: int = 64,
    http_client: httpx.Client | None = None,
    timeout: float = 10.0,
    signals: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> Watch:
    """Watch ``optimizer`` (any ``torch.optim.Adam``/``AdamW``) from the service at ``url``
    as the run ``name``. Parameter names come from ``names``, else ``model``'s
    ``named_parameters()``, else the optimizer's ``param_names``. ``every``: report every
    n-th step. ``http_client``: an httpx client to send with (tests pass the in-process app's).
    Under torch.distributed every rank calls it alike (``rank``/``world_size`` override
    what torch.distributed says): the service shows one run (see :mod:`._watch_dist`).
    Returns the :class:`Watch` handle; see the module docstring."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"watch() takes torch.optim.Adam or AdamW, got {type(optimizer)}")
    http = http_client or httpx.Client(base_url=resolve_url(url), timeout=timeout)
    authorize(http, token)
    topo = topology(optimizer, rank, world_size)
    probe = _new_probe() if signals and topo.reports_signals else None
    return Watch(
        optimizer,
        name=name or "watched",
        http=http,
        names=_param_names(optimizer, model, names),
        every=every,
        queue_size=queue_size,
        probe=probe,
        owns_http=http_client is None,
        topo=topo,
    )
