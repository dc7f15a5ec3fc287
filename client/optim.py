"""``RemoteAdam`` / ``RemoteAdamW``: drop-in ``torch.optim`` optimizers that step remotely.

They *are* ``torch.optim.Adam`` / ``AdamW`` for everything a training loop touches (the
constructor, its validation messages, ``defaults``, ``param_groups`` and so LR schedulers,
``zero_grad``, hooks, ``state_dict()`` / ``load_state_dict()`` in PyTorch's format), but the
Adam state lives in an adamscope stepper: ``step()`` sends the gradients, the service runs
PyTorch's own Adam step, and the updated parameters are written back into the local tensors
in place. ``self.state`` stays empty locally; ``state_dict()`` fetches it.

>>> model = torch.nn.Linear(4, 2)
>>> opt = RemoteAdam(model.named_parameters(), lr=1e-3, url="http://127.0.0.1:8470",
...                  name="linear-run")
>>> loss = model(torch.randn(8, 4)).square().mean(); loss.backward()
>>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .constants import OPTION_NAMES
from .errors import ProtocolError, StepperExistsError, StepperNotFoundError, TransportError
from .protocol import StepperSummary
from .sync import Client

__all__ = ["RemoteAdam", "RemoteAdamW", "RemoteOptimizerMismatch"]


class RemoteOptimizerMismatch(ValueError):
    """An existing stepper of that name holds different parameters than the local model."""


def _strip_names(params: list[Any]) -> tuple[list[Any], list[str] | None]:
    """Accept tensors, (name, tensor) pairs or group dicts; return unnamed params + names."""
    names: list[str] = []
    named = unnamed = False
    out: list[Any] = []

    def take(items: Iterable[Any]) -> list[torch.Tensor]:
        nonlocal named, unnamed
        tensors = []
        for item in items:
            if isinstance(item, tuple):
                named = True
                names.append(str(item[0]))
                tensors.append(item[1])
            else:
                unnamed = True
                tensors.append(item)
        return tensors

    for entry in params:
        if isinstance(entry, dict):
            group = dict(entry)
            ps = group["params"]
            group["params"] = take([ps] if isinstance(ps, torch.Tensor) else list(ps))
            out.append(group)
        else:
            out.extend(take([entry]))
    if named and unnamed:
        raise ValueError("all optimizer params should be either named or unnamed, not a mix")
    return out, (names if named else None)


class _Remote:
    """The remote half shared by RemoteAdam and RemoteAdamW (a mixin before the torch class)."""

    _kind = "adam"
    param_groups: list[dict[str, Any]]
    state: defaultdict[torch.Tensor, Any]

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        url: str | None = None,
        name: str | None = None,
        client: Client | None = None,
        device: str | None = None,
        token: str | None = None,
        wire_dtype: torch.dtype | None = None,
        durability: str | Mapping[str, Any] | None = None,
        shards: int | None = None,
        **kwargs: Any,
    ) -> None:
        if wire_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError("wire_dtype must be None (lossless), torch.bfloat16 or torch.float16")
        self.wire_dtype = wire_dtype
        self._durability = durability
        self._shards = shards
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [dict(g) for g in params]
            for g in params:
                if not isinstance(g["params"], torch.Tensor):
                    g["params"] = list(g["params"])
        unnamed, names = _strip_names(params)
        self._ready = False
        try:
            super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        except TypeError:
            if names is None:
                raise
            # torch < 2.6 takes no (name, tensor) pairs: keep the names here only.
            super().__init__(unnamed, *args, **kwargs)  # type: ignore[call-arg]
        tensors = [p for g in self.param_groups for p in g["params"]]
        self.names: list[str] = (
            names if names is not None else [str(i) for i in range(len(tensors))]
        )
        self._params = tensors
        self._owns_client = client is None
        self.client = client or Client(url, token=token)  # token: else $ADAMSCOPE_TOKEN
        self.name = name or f"{self._kind}-{uuid.uuid4().hex[:12]}"
        self._device = device
        self._synced: list[dict[str, Any]] = []
        try:
            self._attach_or_create()
        except BaseException:
            self.close()
            raise
        self._ready = True

    # ------------------------------------------------------------------ setup

    def _group_names(self) -> list[list[str]]:
        out, i = [], 0
        for g in self.param_groups:
            out.append(self.names[i : i + len(g["params"])])
            i += len(g["params"])
        return out

    def _options(self) -> list[dict[str, Any]]:
        return [{k: g[k] for k in OPTION_NAMES if k in g} for g in self.param_groups]

    def _attach_or_create(self) -> None:
        try:
            summary = self.client.get(self.name)
        except StepperNotFoundError:
            groups = [
                {"params": names, **opts}
                for names, opts in zip(self._group_names(), self._options(), strict=True)
            ]
            try:
                self.client.create(
                    self.name,
                    list(zip(self.names, self._params, strict=True)),
                    optimizer=self._kind,
                    device=self._device,
                    groups=groups,
                    durability=self._durability,
                    shards=self._shards,
                )
                self._synced = self._options()
                self.remote_step = 0
                return
            except StepperExistsError:
                summary = self.client.get(self.name)
        self._attach(summary)

    def _attach(self, summary: StepperSummary) -> None:
        """Resume an existing stepper: its parameters and options replace the local ones."""
        problems = []
        if summary.optimizer != self._kind:
            problems.append(f"optimizer is {summary.optimizer}, not {self._kind}")
        remote_groups = [g.params for g in summary.groups]
        if remote_groups != self._group_names():
            problems.append(f"param groups {remote_groups} != local {self._group_names()}")
        info = {p.name: p for p in summary.params}
        for n, p in zip(self.names, self._params, strict=True):
            r = info.get(n)
            local_dtype = str(p.dtype).removeprefix("torch.")
            if r is not None and (r.shape != list(p.shape) or r.dtype != local_dtype):
                problems.append(
                    f"{n}: remote {r.shape} {r.dtype}, local {list(p.shape)} {local_dtype}"
                )
        if problems:
            raise RemoteOptimizerMismatch(
                f"stepper {self.name!r} exists with different parameters: " + "; ".join(problems)
            )
        values = self.client.get_params(self.name)
        with torch.no_grad():
            for n, p in zip(self.names, self._params, strict=True):
                p.copy_(values[n])
        for g, remote in zip(self.param_groups, summary.groups, strict=True):
            for k in OPTION_NAMES:
                value = getattr(remote, k)
                g[k] = tuple(value) if k == "betas" else value
        self._synced = self._options()
        self.remote_step = summary.step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_ready", False):
            raise NotImplementedError(
                "a remote optimizer's parameters are fixed when its stepper is created"
            )
        super().add_param_group(param_group)  # type: ignore[misc]

    # ------------------------------------------------------------------ the optimizer API

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Send the gradients, run Adam remotely, copy the new parameters in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[str, torch.Tensor] = {}
        for n, p in zip(self.names, self._params, strict=True):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "Adam does not support sparse gradients, please consider SparseAdam instead"
                    )
                grads[n] = p.grad
        options = self._options()
        changed = options if options != self._synced else None
        index = dict(zip(self.names, self._params, strict=True))
        try:
            # The new values of the parameters that stepped are read off the socket
            # straight into the local tensors' memory.
            # The step carries a fresh idempotency key (the client's retries reuse it, so a
            # lost reply never applies it twice) and the step this optimizer last saw: if
            # anyone else stepped the stepper since, StepConflictError, not a silent mix.
            reply = self.client.step(
                self.name,
                grads,
                return_params=True,
                param_groups=changed,
                only_stepped=True,
                into=index,
                wire_dtype=self.wire_dtype,
                expected_step=self.remote_step,
            )
        except (ProtocolError, TransportError):
            # A reply cut short (bad bytes, or the connection lost mid-body) may have left
            # some tensors half-written.
            self.resync()
            raise
        self.remote_step = reply.step
        self._synced = options
        assert reply.params is not None
        with torch.no_grad():
            for n in reply.stepped:
                if reply.params[n] is not index[n]:
                    index[n].copy_(reply.params[n])
        return loss

    def resync(self) -> None:
        """Make the local parameters (and the step this optimizer expects) the stepper's
        again, e.g. after a StepConflictError or a step that failed in flight."""
        self.remote_step = self.client.get(self.name).step
        index = dict(zip(self.names, self._params, strict=True))
        values = self.client.get_params(self.name, into=index)
        with torch.no_grad():
            for n, t in values.items():
                if t is not index[n]:
                    index[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's ``Optimizer.state_dict()`` of the remote state (loads into a local Adam)."""
        remote = self.client.get_state(self.name)
        local = self.state
        self.state = defaultdict(
            dict,
            {
                p: dict(remote[n])
                for n, p in zip(self.names, self._params, strict=True)
                if remote.get(n)
            },
        )
        try:
            return super().state_dict()  # type: ignore[misc, no-any-return]
        finally:
            self.state = local

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a ``torch.optim.Adam`` state_dict: PyTorch's checks and casts, then upload."""
        before = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        loaded = {
            n: dict(self.state[p])
            for n, p in zip(self.names, self._params, strict=True)
            if self.state.get(p)
        }
        self.state = defaultdict(dict)
        try:
            self.client.put_state(self.name, loaded, param_groups=self._options(), replace=True)
        except Exception:
            for g, old in zip(self.param_groups, before, strict=True):
                g.clear()
                g.update(old)
            raise
        self._synced = self._options()

    def remote_summary(self) -> StepperSummary:
        return self.client.get(self.name)

    def close(self) -> None:
        """Close the HTTP connection this optimizer opened (not one passed in as ``client``)."""
        if getattr(self, "_owns_client", False):
            self.client.close()

    def __del__(self) -> None:
        self.close()


class RemoteAdam(_Remote, torch.optim.Adam):  # type: ignore[misc]
    """``torch.optim.Adam`` whose state lives in an adamscope stepper.

    Takes ``torch.optim.Adam``'s arguments plus:

    - ``url``: the service (default ``$ADAMSCOPE_URL``, then ``http://127.0.0.1:8470``);
    - ``name``: the stepper, attached to if it exists with the same parameters, else created;
    - ``token``: a bearer token (default ``$ADAMSCOPE_TOKEN``);
    - ``durability``: the new stepper's policy (``"manual"``, ``{"mode": "every_n", "n": 100}``,
      ...; the service's default, every step, otherwise);
    - ``wire_dtype``: ``torch.bfloat16``/``torch.float16`` for a LOSSY half-size wire;
    - ``shards``: distributed mode (``serve --ray``) only: split a new stepper by parameter
      tensors over that many slots;
    - ``client``: a :class:`.Client` to reuse; ``device``: where the service keeps the
      state (its default otherwise).
    """

    _kind = "adam"


class RemoteAdamW(_Remote, torch.optim.AdamW):  # type: ignore[misc]
    """``torch.optim.AdamW`` whose state lives in an adamscope stepper (see RemoteAdam)."""

    _kind = "adamw"
