"""A stepper: named parameters plus a real ``torch.optim.Adam``/``AdamW`` that owns their state.

Stepping is exactly what a local training loop does, ``p.grad = g; optimizer.step()``, under
the stepper's lock, so a remote step is PyTorch's own step (bit for bit, given the same
implementation, device and dtype). Every mutating method validates *all* of its input before
it touches any tensor, so a rejected request leaves the stepper exactly as it was.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import (
    DeviceOutOfMemory,
    DtypeMismatch,
    DuplicateName,
    InvalidHyperparameter,
    InvalidSpec,
    InvalidState,
    ShapeMismatch,
    StepConflict,
    UnknownParameter,
)
from .footprint import Footprint, footprint, state_bytes, workspace_bytes
from .journal import JOURNAL_KEYS, KeyJournal
from .memory import is_out_of_memory, release_cached, reserve
from .options import (
    OPTIMIZERS,
    OPTION_NAMES,
    STRUCTURAL_OPTIONS,
    SUPPORTED_DTYPES,
    default_options,
    quiet_capturable,
    validate_options,
)
from .steps import StepMirror

__all__ = ["JOURNAL_KEYS", "STATE_KEYS", "GroupDef", "StepObserver", "StepOutcome", "Stepper"]

log = logging.getLogger("adamscope")

#: Per-parameter state tensors of torch.optim.Adam, in PyTorch's order.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class GroupDef:
    """A param group as created: parameter names plus options that differ from defaults."""

    params: list[str]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutcome:
    step: int
    stepped: list[str]
    skipped: list[str]
    params: dict[str, torch.Tensor] | None = None
    replayed: bool = False


class StepObserver(Protocol):
    """Sees every step: ``before_step`` with the gradients set on the parameters (state
    not yet updated), ``after_step`` once ``optimizer.step()`` returned; both under the
    stepper's lock, with ``stepper.observed_step`` the number of the step they see. An
    observer must not modify parameters, gradients or state.

    With ``stepper.defer_after_step`` the ``after_step`` calls wait until :meth:`Stepper.settle`
    (the service calls it once the step's reply has left) or the next mutation, whichever
    comes first: the parameters, state and gradients they read are unchanged until then.
    """

    def before_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None: ...

    def after_step(self, stepper: Stepper, grads: Mapping[str, torch.Tensor]) -> None: ...


MAX_CONTRIBUTORS = 1024


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _placed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A parameter's own leaf tensor on ``device`` (the allocation a create makes)."""
    return t.detach().to(device, copy=True).requires_grad_(True)


def _out_of_memory(error: BaseException, what: str, **extra: Any) -> DeviceOutOfMemory:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DeviceOutOfMemory(f"out of device memory {what} ({first})", **extra)


@contextmanager
def _memory_for(what: str) -> Iterator[None]:
    """Turn an allocation failure into :class:`DeviceOutOfMemory` (a 507): for mutations
    that allocate everything before they change anything."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise _out_of_memory(e, what) from None


class Stepper:
    """One named optimizer instance. Thread-safe: every method takes ``self.lock``."""

    def __init__(
        self,
        name: str,
        kind: str,
        device: torch.device,
        params: Sequence[tuple[str, torch.Tensor]],
        hyperparameters: Mapping[str, Any],
        groups: Sequence[GroupDef] | None = None,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise InvalidSpec(f"unknown optimizer {kind!r}; expected 'adam' or 'adamw'")
        names = [n for n, _ in params]
        if not names:
            raise InvalidSpec("a stepper needs at least one parameter")
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise DuplicateName(f"parameter name {n!r} appears more than once")
            seen.add(n)
        for n, t in params:
            if t.dtype not in SUPPORTED_DTYPES:
                allowed = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
                raise InvalidSpec(
                    f"parameter {n!r} has dtype {_dtype_name(t.dtype)}; Adam steps floating "
                    f"or complex tensors and the wire carries: {allowed}"
                )
            if t.is_sparse:
                raise InvalidSpec(f"parameter {n!r} is sparse; Adam steps dense tensors")
        if groups is None:
            groups = [GroupDef(list(names))]
        grouped: list[str] = [n for g in groups for n in g.params]
        for n in grouped:
            if n not in seen:
                raise UnknownParameter(f"param group names unknown parameter {n!r}")
        if sorted(grouped) != sorted(names):
            dup = sorted({n for n in grouped if grouped.count(n) > 1})
            missing = [n for n in names if n not in grouped]
            raise InvalidSpec(
                "every parameter must be in exactly one group"
                + (f"; in several: {dup}" if dup else "")
                + (f"; in none: {missing}" if missing else "")
            )

        by_name = dict(params)
        base = default_options(kind)
        for k, v in hyperparameters.items():
            if v is not None or k in ("foreach", "fused"):
                base[k] = v
        group_options: list[dict[str, Any]] = []
        for g in groups:
            opts = dict(base)
            opts.update(g.options)
            probe_like = [torch.empty(0, dtype=by_name[n].dtype, device=device)
                          for n in g.params]
            group_options.append(validate_options(kind, opts, probe_like))

        self.name = name
        self.kind = kind
        self.device = device
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        # Leaf tensors that require grad, like nn.Parameter: the optimizer sees exactly what a
        # local training loop would give it.
        try:
            self.params: list[torch.Tensor] = [_placed(by_name[n], device) for n in names]
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise _out_of_memory(e, f"placing the parameters of {name!r} on {device}") from None
        self.group_of: dict[str, int] = {}
        # Each group keeps its parameters in the order given: that order defines PyTorch's
        # state_dict indices (group 0's parameters first, then group 1's, ...).
        self.group_names: list[list[str]] = [list(g.params) for g in groups]
        torch_groups = []
        for gi, (g, opts) in enumerate(zip(groups, group_options, strict=True)):
            for n in g.params:
                self.group_of[n] = gi
            torch_groups.append({"params": [self.params[self.index[n]] for n in g.params],
                                 **opts})
        self.optimizer: torch.optim.Optimizer = quiet_capturable(OPTIMIZERS[kind](torch_groups))
        self.numel = sum(p.numel() for p in self.params)
        self.step_count = 0
        #: Bumped by every mutation: readers can cache anything derived from (name, version).
        self.version = 0
        #: JSON-serializable engine bookkeeping saved with every checkpoint and restored with
        #: it ("extra" in the checkpoint metadata); change it under ``lock`` with a mutation.
        self.journal: dict[str, Any] = {}
        #: The idempotency keys of the last applied steps (persisted with every checkpoint).
        self.keys = KeyJournal(names)
        #: Contributions collected for the next step (accumulate mode); never persisted.
        self._round: dict[str, Any] = {}
        #: Called around every optimizer step (statistics, history).
        self.observers: list[StepObserver] = []
        #: The last observed step's signals (service.engine.signals; empty until then).
        self.signals: dict[str, Any] = {}
        #: The step the observers are looking at (set before their hooks run).
        self.observed_step = 0
        #: Run the observers' ``after_step`` later, in :meth:`settle` (see StepObserver).
        self.defer_after_step = False
        #: (step, gradients, seconds of the step so far) awaiting the after-step observers.
        self._unsettled: tuple[int, Mapping[str, torch.Tensor], float] | None = None
        self._settling = False
        self._step_seconds = 0.0
        self._after_started = 0.0
        self.lock = threading.RLock()
        self.created_at = time.time()
        self.updated_at = self.created_at
        # Reused buffers, so a step allocates nothing large: host buffers the wire writes
        # gradients into, and (on accelerators) device gradients and pinned host mirrors of
        # the parameters for replies.
        self._grad_staging: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._device_grads: dict[str, torch.Tensor] = {}
        self._host_mirrors: dict[str, torch.Tensor] = {}
        #: Each parameter's ``step`` as a float, kept without a device sync (.steps).
        self.steps = StepMirror()
        self._nbytes = {n: p.numel() * p.element_size()
                        for n, p in zip(names, self.params, strict=True)}
        #: The kind of step (stepped names, fresh states) whose working set the allocator
        #: is known to hold: the last one that succeeded (see _working_set).
        self._working_key: tuple[Any, ...] | None = None

    def _touch(self) -> None:
        self.version += 1
        self.updated_at = time.time()

    def param_meta(self, name: str) -> tuple[list[int], torch.dtype]:
        """Shape and dtype of a parameter (raises UnknownParameter)."""
        p = self._param(name)
        return list(p.shape), p.dtype

    def check_gradient(self, name: str, shape: Sequence[int], dtype: torch.dtype,
                       wire_dtype: torch.dtype | None = None) -> None:
        """Raise as :meth:`step` would for a gradient of this shape and dtype (before any
        byte of it has been read). With ``wire_dtype`` (a lossy 16-bit wire), a real
        floating parameter also takes gradients of that dtype."""
        p = self._param(name)
        if wire_dtype is not None and dtype == wire_dtype and p.is_floating_point():
            dtype = p.dtype
        self._check_spec(name, shape, dtype, "gradient")

    def check_value(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Raise as :meth:`put_params` would for a value of this shape and dtype."""
        self._check_spec(name, shape, dtype, "value")

    def check_state_shape(self, name: str, key: str, shape: Sequence[int]) -> None:
        """Raise as :meth:`put_state` would for a state tensor of this shape (before any
        byte of it has been read or allocated)."""
        p = self._param(name)
        if key not in STATE_KEYS:
            raise InvalidState(
                f"unknown state key {key!r} for {name!r}; expected one of {', '.join(STATE_KEYS)}",
                parameter=name,
            )
        if key == "step":
            if math.prod(shape) != 1 or len(shape) > 1:
                raise ShapeMismatch(f"step of {name!r} must be a scalar, got shape {list(shape)}",
                                    parameter=name)
        elif tuple(shape) != tuple(p.shape):
            raise ShapeMismatch(
                f"{key} for {name!r} has shape {list(shape)}, parameter has {list(p.shape)}",
                parameter=name,
            )

    def grad_buffer(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reusable host buffer a gradient for ``name`` is received into (pinned when the
        stepper lives on an accelerator, so the copy to the device can be asynchronous);
        ``dtype`` other than the parameter's: a staging buffer for a lossy wire."""
        p = self._param(name)
        dtype = dtype or p.dtype
        buf = self._grad_staging.get((name, dtype))
        if buf is None:
            pin = self.device.type == "cuda"
            try:
                buf = torch.empty(p.shape, dtype=dtype, pin_memory=pin)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                raise _out_of_memory(e, f"staging the gradient of {name!r}") from None
            self._grad_staging[(name, dtype)] = buf
        return buf

    def host_params(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Parameters as CPU tensors *without* copying where they already live on the CPU.

        The caller must keep mutations out until it is done with them (the API holds the
        stepper's write gate while it streams a reply from this memory).
        """
        with self.lock:
            if self.device.type == "cpu":
                return {n: self.params[self.index[n]].detach() for n in names}
            out = {}
            for n in names:
                p = self.params[self.index[n]]
                mirror = self._host_mirrors.get(n)
                if mirror is None:
                    try:
                        mirror = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                    except Exception as e:
                        if not is_out_of_memory(e):
                            raise
                        raise _out_of_memory(e, "for the reply's host buffers") from None
                    self._host_mirrors[n] = mirror
                mirror.copy_(p.detach(), non_blocking=True)
                out[n] = mirror
            torch.cuda.current_stream(self.device).synchronize()
            return out

    def release_buffers(self) -> None:
        """Drop the reusable buffers (page-locked host memory on a GPU stepper) and hand
        PyTorch's cached blocks back: the stepper has been deleted. A request still in
        flight on it allocates what it needs again."""
        with self.lock:
            self._grad_staging.clear()
            self._device_grads.clear()
            self._host_mirrors.clear()
            self.steps.forget()
        release_cached(self.device)

    def footprint(self) -> Footprint:
        """The memory this stepper holds once every parameter has stepped, under its
        current options (:mod:`.footprint`; no lock taken: shapes never change and reading
        a group's options is atomic)."""
        groups = self.optimizer.param_groups
        return footprint((([self._nbytes[n] for n in names], groups[gi])
                          for gi, names in enumerate(self.group_names)), self.device.type)

    def _to_device(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return g if g.is_contiguous() else g.contiguous()
        dev = self._device_grads.get(name)
        if dev is None:
            dev = torch.empty_like(self._param(name))
            self._device_grads[name] = dev
        return dev.copy_(g, non_blocking=True)

    # ------------------------------------------------------------------ validation helpers

    def _param(self, name: str) -> torch.Tensor:
        i = self.index.get(name)
        if i is None:
            raise UnknownParameter(
                f"stepper {self.name!r} has no parameter {name!r}", parameter=name
            )
        return self.params[i]

    def _check_tensor(self, name: str, t: torch.Tensor, what: str) -> torch.Tensor:
        return self._check_spec(name, list(t.shape), t.dtype, what)

    def _check_spec(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, what: str
    ) -> torch.Tensor:
        p = self._param(name)
        if tuple(shape) != tuple(p.shape):
            raise ShapeMismatch(
                f"{what} for {name!r} has shape {list(shape)}, parameter has {list(p.shape)}",
                parameter=name,
            )
        if dtype != p.dtype:
            raise DtypeMismatch(
                f"{what} for {name!r} has dtype {_dtype_name(dtype)}, "
                f"parameter has {_dtype_name(p.dtype)}",
                parameter=name,
            )
        return p

    def _group_options(self, gi: int) -> dict[str, Any]:
        g = self.optimizer.param_groups[gi]
        return {k: g[k] for k in OPTION_NAMES}

    def _validated_group_updates(
        self, updates: Sequence[Mapping[str, Any]] | None
    ) -> list[dict[str, Any]] | None:
        """Full, PyTorch-validated options per group after ``updates`` (or None)."""
        if updates is None:
            return None
        groups = self.optimizer.param_groups
        if len(updates) != len(groups):
            raise InvalidHyperparameter(
                f"got options for {len(updates)} param group(s); stepper has {len(groups)}"
            )
        result = []
        for gi, upd in enumerate(updates):
            current = self._group_options(gi)
            unknown = set(upd) - set(OPTION_NAMES)
            if unknown:
                raise InvalidHyperparameter(f"unknown option(s): {', '.join(sorted(unknown))}")
            merged = {**current, **upd}
            if "betas" in merged:
                merged["betas"] = tuple(merged["betas"])
            structural = any(merged[k] != current[k] for k in STRUCTURAL_OPTIONS)
            probe_like = [torch.empty(0, dtype=p.dtype, device=p.device)
                          for p in groups[gi]["params"]]
            result.append(validate_options(self.kind, merged, probe_like, probe_step=structural))
        return result

    def _check_state_complete(
        self, state: Mapping[int, Mapping[str, Any]], options: Sequence[Mapping[str, Any]]
    ) -> None:
        for n in self.names:
            s = state.get(self.index[n], {})
            if not s:
                continue
            amsgrad = options[self.group_of[n]]["amsgrad"]
            need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
            missing = [k for k in need if k not in s]
            if missing:
                raise InvalidState(
                    f"state of {n!r} would lack {', '.join(missing)}"
                    + (" (amsgrad=True needs max_exp_avg_sq)" if "max_exp_avg_sq" in missing
                       else "")
                    + "; send the complete state for a parameter that has none yet",
                    parameter=n,
                )

    def _load(self, state: dict[int, dict[str, Any]], options: list[dict[str, Any]]) -> None:
        """Install state and options through ``Optimizer.load_state_dict``: PyTorch's own
        placement and casting rules (e.g. ``step`` on the device when fused/capturable)."""
        groups = [
            {**opts, "params": [self.index[n] for n in self.group_names[gi]]}
            for gi, opts in enumerate(options)
        ]
        with _memory_for(f"loading the state of {self.name!r}"):
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        quiet_capturable(self.optimizer)
        self.steps.forget()
        self._working_key = None

    # ------------------------------------------------------------------ mutations

    def step(
        self,
        grads: Mapping[str, torch.Tensor],
        group_updates: Sequence[Mapping[str, Any]] | None = None,
        return_params: bool = False,
        key: str | None = None,
        expected_step: int | None = None,
    ) -> StepOutcome:
        """Apply one Adam step with ``grads`` (a missing name = ``p.grad is None``).

        ``key`` makes the step idempotent: a step whose key was already applied is not
        applied again; its original outcome comes back with ``replayed=True``.
        ``expected_step`` is the step the caller believes the stepper is at: if it is not,
        nothing happens and :class:`StepConflict` says where the stepper really is.
        """
        with self.lock:
            replay = self._replay(key)
            if replay is not None:
                return replay
            self._check_expected(expected_step)
            for name, g in grads.items():
                self._check_tensor(name, g, "gradient")
            outcome = self._apply(grads, group_updates, key)
            if return_params:
                outcome.params = {n: _cpu_copy(p)
                                  for n, p in zip(self.names, self.params, strict=True)}
            return outcome

    def _replay(self, key: str | None) -> StepOutcome | None:
        if key is None:
            return None
        done = self.keys.lookup(key)
        if done is None:
            return None
        return StepOutcome(*done, replayed=True)

    def recorded(self, key: str) -> StepOutcome | None:
        """The outcome of the step ``key`` applied, if the journal still holds it. Takes no
        lock (the event loop calls it): the lookup is one dict read of an entry that is
        never changed in place."""
        done = self.keys.lookup(key)
        return None if done is None else StepOutcome(*done)

    def _check_expected(self, expected_step: int | None) -> None:
        if expected_step is not None and expected_step != self.step_count:
            raise StepConflict(
                f"the step was built on step {expected_step}, but stepper {self.name!r} is at "
                f"step {self.step_count}", current_step=self.step_count,
            )

    def _remember(self, key: str, outcome: StepOutcome) -> None:
        self.keys.remember(key, outcome.step, outcome.stepped)

    def _apply(
        self,
        grads: Mapping[str, torch.Tensor],
        group_updates: Sequence[Mapping[str, Any]] | None,
        key: str | None,
    ) -> StepOutcome:
        """The step itself, on validated gradients (the lock is held)."""
        new_options = self._validated_group_updates(group_updates)
        if new_options is not None:
            self._check_state_complete(
                {i: s for i, s in enumerate(self._state_by_index())}, new_options
            )
        self._settle()
        states = self._live_states()
        if self.device.type != "cpu" or self.steps.mirror_cpu:
            self.steps.ensure(states)  # so that an interrupted update can be recognized
        fresh = {i for i, st in enumerate(states) if not st}
        old_options = None if new_options is None else [
            self._group_options(gi) for gi in range(len(self.optimizer.param_groups))]
        try:
            # Everything the step allocates first: a failure here leaves nothing changed.
            on_device = {n: self._to_device(n, g) for n, g in grads.items()}
            working, kind = self._working_set(on_device, fresh, new_options)
            reserve(self.device, working)
            if new_options is not None:
                self._apply_options(new_options)
            for n, p in zip(self.names, self.params, strict=True):
                p.grad = on_device.get(n)
            step = self.observed_step = self.step_count + 1
            started = time.perf_counter()
            self._notify("before_step", on_device)
            self.optimizer.step()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise self._undo(e, fresh, old_options) from None
        finally:
            for p in self.params:
                p.grad = None
            if self.device.type == "cuda":
                # The pinned staging buffers are reused by the next request.
                torch.cuda.current_stream(self.device).synchronize()
        self.step_count = step
        self._working_key = kind
        if self.device.type != "cpu" or self.steps.mirror_cpu:
            self.steps.advance(self._live_states())
        self._unsettled = (step, on_device, time.perf_counter() - started)
        if not self.defer_after_step:
            self._settle()
        stepped = [n for n in self.names if n in on_device]
        skipped = [n for n in self.names if n not in on_device]
        outcome = StepOutcome(self.step_count, stepped, skipped)
        if key is not None:
            self._remember(key, outcome)
        self._touch()
        return outcome

    def _live_states(self) -> list[dict[str, Any]]:
        """Each parameter's state dict as the optimizer holds it ({} without state)."""
        state = self.optimizer.state
        return [state.get(p, {}) for p in self.params]

    def _working_set(self, grads: Mapping[str, torch.Tensor], fresh: set[int],
                     options: Sequence[Mapping[str, Any]] | None
                     ) -> tuple[int, tuple[Any, ...] | None]:
        """Device bytes the next ``optimizer.step()`` allocates (the state it creates for
        parameters without one, and its workspace: :mod:`.footprint`), and the key of this
        kind of step. 0 when the last step that succeeded was of the same kind: its
        temporaries' blocks are in the caching allocator then, ready for this one (probing
        again would cache a second copy of the workspace and cost every step)."""
        if self.device.type == "cpu":
            return 0, None
        key = (tuple(grads), tuple(sorted(fresh)))
        if options is None and key == self._working_key:
            return 0, key
        groups = self.optimizer.param_groups
        created, workspace = 0, 0
        for gi, names in enumerate(self.group_names):
            opts = groups[gi] if options is None else options[gi]
            sizes = [self._nbytes[n] for n in names if n in grads]
            created += state_bytes((self._nbytes[n] for n in names
                                    if n in grads and self.index[n] in fresh),
                                   bool(opts["amsgrad"]))
            workspace = max(workspace, workspace_bytes(sizes, opts, self.device.type))
        return created + workspace, key

    def _undo(self, error: BaseException, fresh: set[int],
              old_options: list[dict[str, Any]] | None) -> DeviceOutOfMemory:
        """After an allocation failed during a step: put back what can be put back and say
        whether anything changed (see :mod:`.memory`)."""
        self.observed_step = self.step_count
        states = self._live_states()
        began = self.steps.moved(states, fresh)
        if began is False:
            for i in fresh:  # the state a first step was creating
                self.optimizer.state.pop(self.params[i], None)
            try:
                if old_options is not None:
                    self._apply_options(old_options)
            except Exception:  # noqa: BLE001 - reported as a partial change below
                log.exception("stepper %r: could not restore its options", self.name)
                began = None
        if began is False:
            return _out_of_memory(error, f"for a step of {self.name!r}; nothing was changed",
                                  partial=False)
        self._touch()
        log.error("stepper %r ran out of device memory inside PyTorch's update: its "
                  "parameters and state may be partly updated", self.name)
        return _out_of_memory(
            error, f"inside PyTorch's update of {self.name!r}: its parameters and state may "
            "be partly updated; restore a snapshot or load its state again", partial=True)

    @property
    def unsettled(self) -> bool:
        """Whether the last step's after-step observers are pending or running."""
        return self._unsettled is not None or self._settling

    def settle(self) -> None:
        """Return once the after-step observers of the last step have run (a deferred
        step's signals and history): run them if they are pending, wait for them if
        another thread is running them; a no-op otherwise."""
        if self.unsettled:
            with self.lock:
                self._settle()

    def _settle(self) -> None:
        """:meth:`settle` with the lock held: every mutation calls it first, so the
        observers see the step exactly as it left PyTorch."""
        if self._unsettled is None:
            return
        self._settling = True  # before the pending work leaves _unsettled: see unsettled
        pending, self._unsettled = self._unsettled, None
        step, grads, self._step_seconds = pending
        self.observed_step = step
        self._after_started = time.perf_counter()
        try:
            with torch.no_grad():
                self._notify("after_step", grads)
        finally:
            self._settling = False

    def engine_seconds(self) -> float:
        """For an ``after_step`` observer: the engine time of the observed step so far (its
        before-step observers, PyTorch's update, and the after-step observers until now;
        not the time a deferred step waited for :meth:`settle`)."""
        return self._step_seconds + (time.perf_counter() - self._after_started)

    def _notify(self, hook: str, grads: Mapping[str, torch.Tensor]) -> None:
        """Call the observers; one that fails is logged, never allowed to break a step."""
        for observer in self.observers:
            try:
                getattr(observer, hook)(self, grads)
            except Exception:
                log.exception("step observer %r failed in %s", observer, hook)

    # ------------------------------------------------------------------ accumulate mode

    def contribute(
        self,
        worker: int,
        contributors: int,
        grads: Mapping[str, torch.Tensor],
        key: str | None = None,
        expected_step: int | None = None,
    ) -> StepOutcome | None:
        """One data-parallel worker's gradients for the next step.

        The step is applied once ``contributors`` workers (ids ``0 .. contributors-1``) have
        contributed, with each parameter's gradient the mean of the contributions that
        carry one, summed in worker order: ``(((g_0 + g_1) + g_2) + ...) / n``. Returns the
        outcome when this contribution completed the step, else None (pending). A retried
        contribution (same ``key``) counts once.
        """
        with self.lock:
            replay = self._replay(key)
            if replay is not None:
                return replay
            if not 1 <= contributors <= MAX_CONTRIBUTORS:
                raise InvalidSpec(f"contributors must be 1..{MAX_CONTRIBUTORS}, got {contributors}")
            if not 0 <= worker < contributors:
                raise InvalidSpec(f"worker must be in 0..{contributors - 1}, got {worker}")
            if self._round and self._round["contributors"] != contributors:
                raise StepConflict(
                    f"the pending step of {self.name!r} collects {self._round['contributors']} "
                    f"contributions, not {contributors}", current_step=self.step_count)
            self._check_expected(expected_step)
            pending: dict[int, Any] = self._round.get("workers", {})
            if worker in pending:
                if key is not None and pending[worker]["key"] == key:
                    return None  # the same contribution again: still pending
                raise StepConflict(
                    f"worker {worker} already contributed to step {self.step_count + 1} of "
                    f"{self.name!r}", current_step=self.step_count)
            for name, g in grads.items():
                self._check_tensor(name, g, "gradient")
            copies = {n: g.detach().clone() for n, g in grads.items()}
            self._round = {"contributors": contributors,
                           "workers": {**pending, worker: {"key": key, "grads": copies}}}
            self._touch()
            if len(self._round["workers"]) < contributors:
                return None
            return self._commit_round()

    def commit(self) -> StepOutcome:
        """Apply the pending step with the contributions that have arrived."""
        with self.lock:
            if not self._round:
                raise StepConflict(f"stepper {self.name!r} has no pending contributions",
                                   current_step=self.step_count)
            return self._commit_round()

    def pending_contributions(self) -> list[int]:
        with self.lock:
            return sorted(self._round.get("workers", {}))

    def _commit_round(self) -> StepOutcome:
        workers = self._round["workers"]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for w in sorted(workers):
            for n, g in workers[w]["grads"].items():
                if n in sums:
                    sums[n].add_(g)
                else:
                    sums[n] = g.clone()
                counts[n] = counts.get(n, 0) + 1
        grads = {n: sums[n].div_(counts[n]) for n in self.names if n in sums}
        self._round = {}
        outcome = self._apply(grads, None, None)
        for w in workers.values():
            if w["key"] is not None:
                self._remember(w["key"], outcome)
        return outcome

    def _state_by_index(self) -> list[dict[str, Any]]:
        return [dict(self.optimizer.state.get(p, {})) for p in self.params]

    def _apply_options(self, options: list[dict[str, Any]]) -> None:
        placement_changed = any(
            options[gi][k] != self._group_options(gi)[k]
            for gi in range(len(options)) for k in ("fused", "capturable")
        )
        if placement_changed:
            self._load(dict(enumerate(self._state_by_index())), options)
        else:
            for g, opts in zip(self.optimizer.param_groups, options, strict=True):
                g.update(opts)
        self._working_key = None

    def set_hyperparameters(self, updates: Mapping[str, Any], group: int | None = None) -> None:
        """Change options of one group or all groups, validated by PyTorch first."""
        with self.lock:
            self._settle()
            n = len(self.optimizer.param_groups)
            if group is not None and not 0 <= group < n:
                raise InvalidHyperparameter(f"param group {group} does not exist (have {n})")
            per_group = [dict(updates) if group in (None, gi) else {} for gi in range(n)]
            new_options = self._validated_group_updates(per_group)
            assert new_options is not None
            self._check_state_complete(dict(enumerate(self._state_by_index())), new_options)
            self._apply_options(new_options)
            self._touch()

    def put_params(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Overwrite some or all parameter values in place."""
        with self.lock:
            self._settle()
            for name, t in tensors.items():
                self._check_tensor(name, t, "value")
            with _memory_for(f"for new values of {self.name!r}"):
                staged = {n: t.to(self.device) for n, t in tensors.items()}
            with torch.no_grad():
                for n, t in staged.items():
                    self.params[self.index[n]].copy_(t)
            self._touch()

    def put_state(
        self,
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        group_options: Sequence[Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> None:
        """Replace state tensors (all, some parameters, or single tensors) and optionally
        every group's options, atomically. ``replace`` drops state not given (a full load,
        as ``load_state_dict`` does); otherwise unspecified tensors are kept."""
        with self.lock:
            self._settle()
            current = self._state_by_index()
            new_state: dict[int, dict[str, Any]] = (
                {} if replace else {i: s for i, s in enumerate(current) if s}
            )
            for name, entries in tensors.items():
                p = self._param(name)
                target = dict(new_state.get(self.index[name], {}))
                for key, t in entries.items():
                    with _memory_for(f"for the state of {self.name!r}"):
                        target[key] = self._checked_state_tensor(name, p, key, t)
                if target:
                    new_state[self.index[name]] = target
            options = self._validated_group_updates(group_options) or [
                self._group_options(gi) for gi in range(len(self.optimizer.param_groups))
            ]
            self._check_state_complete(new_state, options)
            self._load(new_state, options)
            self._touch()

    def _checked_state_tensor(
        self, name: str, p: torch.Tensor, key: str, t: torch.Tensor
    ) -> torch.Tensor:
        if key not in STATE_KEYS:
            raise InvalidState(
                f"unknown state key {key!r} for {name!r}; expected one of {', '.join(STATE_KEYS)}",
                parameter=name,
            )
        if key == "step":
            if t.numel() != 1 or t.dim() > 1:
                raise ShapeMismatch(f"step of {name!r} must be a scalar, got shape {list(t.shape)}",
                                    parameter=name)
            if t.dtype.is_complex or t.dtype == torch.bool:
                raise DtypeMismatch(f"step of {name!r} must be a real number", parameter=name)
            value = float(t.reshape(()).item())
            if not (math.isfinite(value) and value >= 0):
                raise InvalidState(f"step of {name!r} must be finite and >= 0, got {value}",
                                   parameter=name)
            if not t.dtype.is_floating_point:
                t = t.to(torch.float32)
            return t.reshape(()).clone()
        if tuple(t.shape) != tuple(p.shape):
            raise ShapeMismatch(
                f"{key} for {name!r} has shape {list(t.shape)}, parameter has {list(p.shape)}",
                parameter=name,
            )
        # PyTorch casts floating state to the parameter's dtype on load; other params keep
        # the state's dtype, so for those it must already match.
        ok = t.dtype == p.dtype or (p.is_floating_point() and t.is_floating_point())
        if not ok:
            raise DtypeMismatch(
                f"{key} for {name!r} has dtype {_dtype_name(t.dtype)}, "
                f"parameter has {_dtype_name(p.dtype)}",
                parameter=name,
            )
        return t.to(device=self.device, dtype=p.dtype)

    def reset_state(self, names: Sequence[str] | None = None) -> None:
        """Forget Adam state (moments and step) of some or all parameters."""
        with self.lock:
            self._settle()
            drop = set(self.names if names is None else names)
            for n in drop:
                self._param(n)
            for n in drop:
                self.optimizer.state.pop(self.params[self.index[n]], None)
            self.steps.forget()
            self._working_key = None
            self._touch()

    # ------------------------------------------------------------------ reads

    def get_params(self, names: Sequence[str] | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        with self.lock:
            selected = self._select(names)
            return self.step_count, {n: _cpu_copy(self.params[self.index[n]]) for n in selected}

    def get_state(
        self, names: Sequence[str] | None = None, keys: Sequence[str] | None = None,
        with_params: bool = False,
    ) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
        """State tensors by parameter, copied under the lock; ``with_params`` adds each
        parameter's value as key ``"param"``, so one read is one consistent snapshot."""
        with self.lock:
            selected = self._select(names)
            if keys is not None:
                for k in keys:
                    if k not in STATE_KEYS:
                        raise InvalidState(
                            f"unknown state key {k!r}; expected one of {', '.join(STATE_KEYS)}"
                        )
            out: dict[str, dict[str, torch.Tensor]] = {}
            for n in selected:
                s = self.optimizer.state.get(self.params[self.index[n]], {})
                out[n] = {k: _cpu_copy(s[k]) for k in STATE_KEYS
                          if k in s and (keys is None or k in keys)}
                if with_params:
                    out[n]["param"] = _cpu_copy(self.params[self.index[n]])
            return self.step_count, out

    def _select(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self.names)
        for n in names:
            self._param(n)
        return list(dict.fromkeys(names))

    def param_steps(self) -> list[float | None]:
        """Each parameter's state step (None without state), in parameter order, without a
        device sync per parameter (:mod:`.steps`)."""
        with self.lock:
            return self.steps.values(self._live_states())

    def param_step(self, name: str) -> float | None:
        return self.param_steps()[self.index[name]]

    def bias_correction(self, step: float | None = None) -> dict[str, Any]:
        """Bias-correction factors as ``_single_tensor_adam`` computes them (Python floats).

        Per group at ``step`` (default: the stepper's step count), and, when ``step`` is not
        given, per parameter at that parameter's own state step.
        """
        with self.lock:
            if step is not None and not (math.isfinite(step) and step >= 0):
                raise InvalidState(f"step must be finite and >= 0, got {step}")
            t_groups = float(self.step_count if step is None else step)
            groups = [self._factors(g, t_groups) for g in self.optimizer.param_groups]
            params: dict[str, Any] = {}
            if step is None:
                for n, t in zip(self.names, self.param_steps(), strict=True):
                    if t is not None:
                        g = self.optimizer.param_groups[self.group_of[n]]
                        params[n] = self._factors(g, t)
            return {"step": self.step_count, "groups": groups, "params": params}

    @staticmethod
    def _factors(group: Mapping[str, Any], t: float) -> dict[str, float | None]:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        return {
            "step": t,
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "bias_correction1": bc1,
            "bias_correction2": bc2,
            "step_size": lr / bc1 if bc1 != 0 else None,
            "bias_correction2_sqrt": bc2**0.5,
        }

    def summary(self) -> dict[str, Any]:
        with self.lock:
            params = []
            nbytes = 0
            steps = self.param_steps()
            for n, p, t in zip(self.names, self.params, steps, strict=True):
                s = self.optimizer.state.get(p, {})
                nbytes += p.numel() * p.element_size()
                nbytes += sum(v.numel() * v.element_size() for v in s.values()
                              if torch.is_tensor(v))
                params.append({
                    "name": n,
                    "shape": list(p.shape),
                    "dtype": _dtype_name(p.dtype),
                    "numel": p.numel(),
                    "group": self.group_of[n],
                    "step": t,
                    "state": [k for k in STATE_KEYS if k in s],
                })
            groups = []
            for gi, g in enumerate(self.optimizer.param_groups):
                opts = {k: g[k] for k in OPTION_NAMES}
                opts["lr"] = float(opts["lr"])
                opts["betas"] = tuple(float(b) for b in opts["betas"])
                groups.append({"index": gi, "params": self.group_names[gi], **opts})
            return {
                "name": self.name,
                "optimizer": self.kind,
                "device": str(self.device),
                "step": self.step_count,
                "numel": sum(p.numel() for p in self.params),
                "state_bytes": nbytes,
                "footprint": self.footprint().as_dict(),
                "params": params,
                "groups": groups,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            }
