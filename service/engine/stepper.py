"""A stepper: named parameters plus a real ``torch.optim.Adam``/``AdamW`` that owns their state.

Stepping is exactly what a local training loop does, ``p.grad = g; optimizer.step()``, under
the stepper's lock, so a remote step is PyTorch's own step (bit for bit, given the same
implementation, device and dtype). Every mutating method validates *all* of its input before
it touches any tensor, so a rejected request leaves the stepper exactly as it was.
"""

# Long: one class owns a stepper's lock, optimizer and step count, and every method here
# reads or changes them under that lock; what needs neither lives beside it (spec: the
# layout checked at creation; state: Adam state checks; buffers; accumulate: pending
# contributions; observers; report: summary and bias correction; trial: dry runs).

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client.constants import OPTION_NAMES

from . import report
from . import state as adam_state
from .accumulate import Round
from .buffers import Buffers, out_of_memory
from .errors import (
    DeviceOutOfMemory,
    DtypeMismatch,
    InvalidHyperparameter,
    InvalidSpec,
    InvalidState,
    ShapeMismatch,
    StepConflict,
    StepperFrozen,
    StepperWatched,
    UnknownParameter,
)
from .footprint import Footprint, footprint, step_working_set
from .journal import KeyJournal
from .memory import is_out_of_memory, release_cached, reserve
from .observers import Observers, StepObserver
from .options import OPTIMIZERS, STRUCTURAL_OPTIONS, quiet_capturable, validate_options
from .spec import GroupDef, checked_spec, dtype_name
from .state import STATE_KEYS
from .steps import StepMirror
from .trial import Trial

__all__ = ["FROZEN", "HOSTED", "HOSTINGS", "WATCHED", "StepOutcome", "Stepper"]

log = logging.getLogger("adamscope")

#: What a stepper is for: ``hosted``, stepped here (RemoteAdam, the step endpoint);
#: ``frozen``, an imported checkpoint kept as it was written: it refuses steps (its state
#: and options can still be edited, to try a fix); ``watched``, the mirror of an optimizer
#: that lives in a training job (``adamscope.watch``): its trainer reports each step, and
#: steps and edits here are refused (they are queued to the trainer: :mod:`.watched`).
#: A summary's ``kind``.
HOSTED, FROZEN, WATCHED = "hosted", "frozen", "watched"
HOSTINGS = (HOSTED, FROZEN, WATCHED)
#: Where a stepper that is not hosted says so in its journal (saved with its checkpoints).
HOSTING_KEY = "kind"


@dataclass
class StepOutcome:
    step: int
    stepped: list[str]
    skipped: list[str]
    params: dict[str, torch.Tensor] | None = None
    replayed: bool = False


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _placed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A parameter's own leaf tensor on ``device`` (the allocation a create makes)."""
    return t.detach().to(device, copy=True).requires_grad_(True)


@contextmanager
def _memory_for(what: str) -> Iterator[None]:
    """Turn an allocation failure into :class:`DeviceOutOfMemory` (a 507): for mutations
    that allocate everything before they change anything."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, what) from None


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
        *,
        step: int = 0,
        hosting: str = HOSTED,
    ) -> None:
        spec = checked_spec(kind, device, params, hyperparameters, groups)
        if hosting not in HOSTINGS:
            raise InvalidSpec(f"unknown kind {hosting!r}; expected one of {', '.join(HOSTINGS)}")
        if step < 0:
            raise InvalidSpec(f"step must be >= 0, got {step}")
        self.name, self.kind, self.device = name, kind, device
        self.names = spec.names
        self.index = {n: i for i, n in enumerate(self.names)}
        by_name = dict(params)
        # Leaf tensors that require grad, like nn.Parameter: the optimizer sees exactly what a
        # local training loop would give it.
        with _memory_for(f"placing the parameters of {name!r} on {device}"):
            self.params: list[torch.Tensor] = [_placed(by_name[n], device) for n in self.names]
        self.group_names: list[list[str]] = [list(g.params) for g in spec.groups]
        self.group_of = {n: gi for gi, names in enumerate(self.group_names) for n in names}
        self.optimizer: torch.optim.Optimizer = quiet_capturable(
            OPTIMIZERS[kind](
                [
                    {"params": [self.params[self.index[n]] for n in names], **opts}
                    for names, opts in zip(self.group_names, spec.options, strict=True)
                ]
            )
        )
        self.numel = sum(p.numel() for p in self.params)
        #: An imported checkpoint starts at the step its training job had reached.
        self.step_count = step
        #: Bumped by every mutation: readers can cache anything derived from (name, version).
        self.version = 0
        #: JSON-serializable bookkeeping saved with every checkpoint and restored with it
        #: ("extra" in the checkpoint metadata); change it with :meth:`set_journal`.
        self.journal: dict[str, Any] = {} if hosting == HOSTED else {HOSTING_KEY: hosting}
        #: The idempotency keys of the last applied steps (persisted with every checkpoint).
        self.keys = KeyJournal(self.names)
        self._round = Round(name)
        self._observers = Observers()
        self.lock = threading.RLock()
        self.created_at = self.updated_at = time.time()
        self.buffers = Buffers(device)
        #: Each parameter's ``step`` as a float, kept without a device sync (.steps).
        self.steps = StepMirror()
        self._nbytes = {
            n: p.numel() * p.element_size() for n, p in zip(self.names, self.params, strict=True)
        }
        #: The kind of step (stepped names, fresh states) whose working set the allocator
        #: is known to hold: the last one that succeeded (see _working_set).
        self._working_key: tuple[Any, ...] | None = None

    def _touch(self) -> None:
        self.version += 1
        self.updated_at = time.time()

    # ------------------------------------------------------------------ observers

    @property
    def observers(self) -> list[StepObserver]:
        """Called around every optimizer step (see :mod:`.observers`)."""
        return self._observers.observers

    @property
    def defer_after_step(self) -> bool:
        return self._observers.defer

    @defer_after_step.setter
    def defer_after_step(self, value: bool) -> None:
        self._observers.defer = value

    @property
    def observed_step(self) -> int:
        return self._observers.observed_step

    @property
    def unsettled(self) -> bool:
        """Whether the last step's after-step observers are pending or running."""
        return self._observers.unsettled

    def settle(self) -> None:
        """Return once the after-step observers of the last step have run (a deferred
        step's signals and history): run them if they are pending, wait for them if
        another thread is running them; a no-op otherwise."""
        if self.unsettled:
            with self.lock:
                self._settle()

    def _settle(self) -> None:
        self._observers.settle(self)

    def engine_seconds(self) -> float:
        return self._observers.engine_seconds()

    # ------------------------------------------------------------------ tensors, for readers

    def param(self, name: str) -> torch.Tensor:
        """Parameter ``name`` itself (raises UnknownParameter); read it under the lock."""
        i = self.index.get(name)
        if i is None:
            raise UnknownParameter(
                f"stepper {self.name!r} has no parameter {name!r}", parameter=name
            )
        return self.params[i]

    def param_state(self, name: str) -> Mapping[str, Any]:
        """Its Adam state as the optimizer holds it ({} before its first step)."""
        found: Mapping[str, Any] = self.optimizer.state.get(self.param(name), {})
        return found

    def param_group(self, name: str) -> Mapping[str, Any]:
        """Its param group (options by PyTorch's names, and the group's tensors)."""
        return self.optimizer.param_groups[self.group_of[name]]

    def group_options(self) -> list[dict[str, Any]]:
        return [self._group_options(gi) for gi in range(len(self.optimizer.param_groups))]

    def select(self, names: Sequence[str] | None) -> list[str]:
        """``names`` checked and without repeats (all parameters when None)."""
        if names is None:
            return list(self.names)
        for n in names:
            self.param(n)
        return list(dict.fromkeys(names))

    @property
    def hosting(self) -> str:
        """``"hosted"`` (steps run here) or ``"frozen"`` (steps refused, edits allowed).
        Kept in the journal, so it is written and restored with the stepper's state."""
        return str(self.journal.get(HOSTING_KEY, HOSTED))

    def set_hosting(self, hosting: str) -> None:
        if hosting not in HOSTINGS:
            raise InvalidSpec(f"unknown kind {hosting!r}; expected one of {', '.join(HOSTINGS)}")
        self.set_journal(HOSTING_KEY, None if hosting == HOSTED else hosting)

    def _check_not_frozen(self) -> None:
        self._check_not_watched("steps")
        if self.hosting == FROZEN:
            raise StepperFrozen(
                f"stepper {self.name!r} is frozen (an imported checkpoint): it refuses steps; "
                "its state and options can still be edited. Make it steppable with "
                f'PATCH /v1/steppers/{self.name} {{"kind": "hosted"}}',
                kind=FROZEN,
            )

    def check_hosted_tensors(self, what: str) -> None:
        """Raise :class:`StepperWatched` for a watched run, whose tensors live in the
        trainer (the service keeps only its signals): ``what`` names the refused read."""
        if self.hosting == WATCHED:
            raise StepperWatched(
                f"stepper {self.name!r} is watched: its tensors live in the training job, "
                f"which reports only its signals here, so {what} are not available; read "
                f"its state with GET /v1/watch/{self.name}/state (the trainer answers at its "
                "next step)",
                kind=WATCHED,
            )

    def _check_not_watched(self, what: str) -> None:
        if self.hosting == WATCHED:
            raise StepperWatched(
                f"stepper {self.name!r} is watched: its optimizer lives in a training job, "
                f"which reports it; {what} are sent to the trainer as commands "
                f"(POST /v1/watch/{self.name}/commands), applied between two of its steps",
                kind=WATCHED,
            )

    def set_journal(self, key: str, value: Any) -> None:
        """Set (``None``: remove) a journal entry: a change of the stepper, written with
        its next checkpoint. The last step is settled first (judged as it was taken)."""
        with self.lock:
            self._settle()
            if value is None:
                self.journal.pop(key, None)
            else:
                self.journal[key] = value
            self._touch()

    # ------------------------------------------------------------------ checks and buffers

    def param_meta(self, name: str) -> tuple[list[int], torch.dtype]:
        """Shape and dtype of a parameter (raises UnknownParameter)."""
        p = self.param(name)
        return list(p.shape), p.dtype

    def check_gradient(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        """Raise as :meth:`step` would for a gradient of this shape and dtype (before any
        byte of it has been read). With ``wire_dtype`` (a lossy 16-bit wire), a real
        floating parameter also takes gradients of that dtype."""
        p = self.param(name)
        if wire_dtype is not None and dtype == wire_dtype and p.is_floating_point():
            dtype = p.dtype
        self._check_spec(name, shape, dtype, "gradient")

    def check_value(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        """Raise as :meth:`put_params` would for a value of this shape and dtype."""
        self._check_spec(name, shape, dtype, "value")

    def check_state_shape(self, name: str, key: str, shape: Sequence[int]) -> None:
        """Raise as :meth:`put_state` would for a state tensor of this shape (before any
        byte of it has been read or allocated)."""
        adam_state.check_shape(name, key, shape, self.param(name))

    def grad_buffer(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reusable host buffer a gradient for ``name`` is received into (pinned when the
        stepper lives on an accelerator, so the copy to the device can be asynchronous);
        ``dtype`` other than the parameter's: a staging buffer for a lossy wire."""
        p = self.param(name)
        return self.buffers.grad(name, p, dtype or p.dtype)

    def host_params(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Parameters as CPU tensors *without* copying where they already live on the CPU.

        The caller must keep mutations out until it is done with them (the API holds the
        stepper's write gate while it streams a reply from this memory).
        """
        with self.lock:
            return self.buffers.host({n: self.params[self.index[n]] for n in names})

    def release_buffers(self) -> None:
        """Drop the reusable buffers (page-locked host memory on a GPU stepper) and hand
        PyTorch's cached blocks back: the stepper has been deleted. A request still in
        flight on it allocates what it needs again."""
        with self.lock:
            self.buffers.clear()
            self.steps.forget()
        release_cached(self.device)

    def footprint(self) -> Footprint:
        """The memory this stepper holds once every parameter has stepped, under its
        current options (:mod:`.footprint`; no lock taken: shapes never change and reading
        a group's options is atomic). None for a watched run: its tensors are its trainer's
        (here its parameters are on the meta device: shapes, no storage)."""
        if self.device.type == "meta":
            return footprint((), "meta")
        groups = self.optimizer.param_groups
        return footprint(
            (
                ([self._nbytes[n] for n in names], groups[gi])
                for gi, names in enumerate(self.group_names)
            ),
            self.device.type,
        )

    def _check_tensor(self, name: str, t: torch.Tensor, what: str) -> torch.Tensor:
        return self._check_spec(name, list(t.shape), t.dtype, what)

    def _check_spec(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, what: str
    ) -> torch.Tensor:
        p = self.param(name)
        if tuple(shape) != tuple(p.shape):
            raise ShapeMismatch(
                f"{what} for {name!r} has shape {list(shape)}, parameter has {list(p.shape)}",
                parameter=name,
            )
        if dtype != p.dtype:
            raise DtypeMismatch(
                f"{what} for {name!r} has dtype {dtype_name(dtype)}, "
                f"parameter has {dtype_name(p.dtype)}",
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
            probe_like = [
                torch.empty(0, dtype=p.dtype, device=p.device) for p in groups[gi]["params"]
            ]
            result.append(validate_options(self.kind, merged, probe_like, probe_step=structural))
        return result

    def _check_state_complete(
        self, state: Mapping[int, Mapping[str, Any]], options: Sequence[Mapping[str, Any]]
    ) -> None:
        for n in self.names:
            s = state.get(self.index[n], {})
            missing = adam_state.missing_keys(s, options[self.group_of[n]]["amsgrad"]) if s else []
            if missing:
                raise InvalidState(
                    f"state of {n!r} would lack {', '.join(missing)}"
                    + (
                        " (amsgrad=True needs max_exp_avg_sq)"
                        if "max_exp_avg_sq" in missing
                        else ""
                    )
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

    # ------------------------------------------------------------------ steps

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
                outcome.params = {
                    n: _cpu_copy(p) for n, p in zip(self.names, self.params, strict=True)
                }
            return outcome

    def _replay(self, key: str | None) -> StepOutcome | None:
        done = None if key is None else self.keys.lookup(key)
        return None if done is None else StepOutcome(*done, replayed=True)

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
                f"step {self.step_count}",
                current_step=self.step_count,
            )

    def _apply(
        self,
        grads: Mapping[str, torch.Tensor],
        group_updates: Sequence[Mapping[str, Any]] | None,
        key: str | None,
    ) -> StepOutcome:
        """The step itself, on validated gradients (the lock is held)."""
        self._check_not_frozen()
        new_options = self._validated_group_updates(group_updates)
        if new_options is not None:
            self._check_state_complete(dict(enumerate(self._state_by_index())), new_options)
        self._settle()
        states = self._live_states()
        if self.device.type != "cpu" or self.steps.mirror_cpu:
            self.steps.ensure(states)  # so that an interrupted update can be recognized
        fresh = {i for i, st in enumerate(states) if not st}
        old_options = None if new_options is None else self.group_options()
        try:
            # Everything the step allocates first: a failure here leaves nothing changed.
            on_device = {n: self.buffers.on_device(n, self.param(n), g) for n, g in grads.items()}
            working, kind = self._working_set(on_device, fresh, new_options)
            reserve(self.device, working)
            if new_options is not None:
                self._apply_options(new_options)
            for n, p in zip(self.names, self.params, strict=True):
                p.grad = on_device.get(n)
            step = self.step_count + 1
            started = time.perf_counter()
            self._observers.before(self, step, on_device)
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
        self._observers.after(self, step, on_device, time.perf_counter() - started)
        outcome = StepOutcome(
            self.step_count,
            [n for n in self.names if n in on_device],
            [n for n in self.names if n not in on_device],
        )
        if key is not None:
            self.keys.remember(key, outcome.step, outcome.stepped)
        self._touch()
        return outcome

    def _live_states(self) -> list[dict[str, Any]]:
        """Each parameter's state dict as the optimizer holds it ({} without state)."""
        state = self.optimizer.state
        return [state.get(p, {}) for p in self.params]

    def _working_set(
        self,
        grads: Mapping[str, torch.Tensor],
        fresh: set[int],
        options: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[int, tuple[Any, ...] | None]:
        """Device bytes the next ``optimizer.step()`` allocates (:mod:`.footprint`), and the
        key of this kind of step. 0 when the last step that succeeded was of the same kind:
        its temporaries' blocks are in the caching allocator then, ready for this one
        (probing again would cache a second copy of the workspace and cost every step)."""
        if self.device.type == "cpu":
            return 0, None
        key = (tuple(grads), tuple(sorted(fresh)))
        if options is None and key == self._working_key:
            return 0, key
        groups = self.optimizer.param_groups if options is None else options
        return step_working_set(
            (
                (
                    [(self._nbytes[n], self.index[n] in fresh) for n in names if n in grads],
                    groups[gi],
                )
                for gi, names in enumerate(self.group_names)
            ),
            self.device.type,
        ), key

    def _undo(
        self, error: BaseException, fresh: set[int], old_options: list[dict[str, Any]] | None
    ) -> DeviceOutOfMemory:
        """After an allocation failed during a step: put back what can be put back and say
        whether anything changed (see :mod:`.memory`)."""
        self._observers.observed_step = self.step_count
        began = self.steps.moved(self._live_states(), fresh)
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
            return out_of_memory(
                error, f"for a step of {self.name!r}; nothing was changed", partial=False
            )
        self._touch()
        log.error(
            "stepper %r ran out of device memory inside PyTorch's update: its "
            "parameters and state may be partly updated",
            self.name,
        )
        return out_of_memory(
            error,
            f"inside PyTorch's update of {self.name!r}: its parameters and state may "
            "be partly updated; restore a snapshot or load its state again",
            partial=True,
        )

    def trial(
        self,
        grads: Mapping[str, torch.Tensor],
        group_updates: Sequence[Mapping[str, Any]] | None = None,
    ) -> Trial:
        """Copies of what a step with ``grads`` (and option changes) would step, ready to
        run (:mod:`.trial`); raises what :meth:`step` would. The last step is settled."""
        with self.lock:
            self._settle()
            for name, g in grads.items():
                self._check_tensor(name, g, "gradient")
            options = self._validated_group_updates(group_updates)
            if options is not None:
                self._check_state_complete(dict(enumerate(self._state_by_index())), options)
            else:
                options = [
                    {k: v for k, v in g.items() if k != "params"}
                    for g in self.optimizer.param_groups
                ]
            live = {n: self.params[self.index[n]] for n in self.names if n in grads}
            return Trial.build(
                self.name,
                self.kind,
                self.step_count + 1,
                [n for n in self.names if n not in grads],
                live,
                {n: self.param_state(n) for n in live},
                self.group_of,
                options,
                grads,
            )

    # ------------------------------------------------------------------ accumulate mode

    def contribute(
        self,
        worker: int,
        contributors: int,
        grads: Mapping[str, torch.Tensor],
        key: str | None = None,
        expected_step: int | None = None,
    ) -> StepOutcome | None:
        """One data-parallel worker's gradients for the next step (:mod:`.accumulate`).
        Returns the outcome when this contribution completed the step, else None
        (pending). A retried contribution (same ``key``) counts once."""
        with self.lock:
            replay = self._replay(key)
            if replay is not None:
                return replay
            self._check_not_frozen()
            self._round.check(worker, contributors, self.step_count)
            self._check_expected(expected_step)
            if self._round.repeated(worker, key, self.step_count):
                return None  # the same contribution again: still pending
            for name, g in grads.items():
                self._check_tensor(name, g, "gradient")
            complete = self._round.add(worker, contributors, key, grads)
            self._touch()
            return self._commit_round() if complete else None

    def commit(self) -> StepOutcome:
        """Apply the pending step with the contributions that have arrived."""
        with self.lock:
            if not self._round:
                raise StepConflict(
                    f"stepper {self.name!r} has no pending contributions",
                    current_step=self.step_count,
                )
            return self._commit_round()

    def pending_contributions(self) -> list[int]:
        with self.lock:
            return self._round.pending()

    def _commit_round(self) -> StepOutcome:
        grads, keys = self._round.take(self.names)
        outcome = self._apply(grads, None, None)
        for key in keys:
            self.keys.remember(key, outcome.step, outcome.stepped)
        return outcome

    # ------------------------------------------------------------------ other mutations

    def _state_by_index(self) -> list[dict[str, Any]]:
        return [dict(self.optimizer.state.get(p, {})) for p in self.params]

    def _apply_options(self, options: list[dict[str, Any]]) -> None:
        placement_changed = any(
            options[gi][k] != self._group_options(gi)[k]
            for gi in range(len(options))
            for k in ("fused", "capturable")
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
            self._check_not_watched("option changes")
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
            self._check_not_watched("parameter writes")
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
            self._check_not_watched("state loads")
            self._settle()
            new_state: dict[int, dict[str, Any]] = (
                {} if replace else {i: s for i, s in enumerate(self._state_by_index()) if s}
            )
            for name, entries in tensors.items():
                p = self.param(name)
                target = dict(new_state.get(self.index[name], {}))
                for key, t in entries.items():
                    with _memory_for(f"for the state of {self.name!r}"):
                        target[key] = adam_state.checked_tensor(name, key, t, p, self.device)
                if target:
                    new_state[self.index[name]] = target
            options = self._validated_group_updates(group_options) or self.group_options()
            self._check_state_complete(new_state, options)
            self._load(new_state, options)
            self._touch()

    def reset_state(self, names: Sequence[str] | None = None) -> None:
        """Forget Adam state (moments and step) of some or all parameters."""
        with self.lock:
            self._check_not_watched("state resets")
            self._settle()
            drop = set(self.names if names is None else names)
            for n in drop:
                self.param(n)
            for n in drop:
                self.optimizer.state.pop(self.params[self.index[n]], None)
            self.steps.forget()
            self._working_key = None
            self._touch()

    # ------------------------------------------------------------------ reads

    def get_params(self, names: Sequence[str] | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        with self.lock:
            self._check_not_watched("tensor reads")
            selected = self.select(names)
            return self.step_count, {n: _cpu_copy(self.params[self.index[n]]) for n in selected}

    def get_state(
        self,
        names: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        with_params: bool = False,
    ) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
        """State tensors by parameter, copied under the lock; ``with_params`` adds each
        parameter's value as key ``"param"``, so one read is one consistent snapshot."""
        with self.lock:
            self._check_not_watched("tensor reads (GET /v1/watch/{name}/state asks the trainer)")
            selected = self.select(names)
            for k in keys or ():
                if k not in STATE_KEYS:
                    raise InvalidState(
                        f"unknown state key {k!r}; expected one of {', '.join(STATE_KEYS)}"
                    )
            out: dict[str, dict[str, torch.Tensor]] = {}
            for n in selected:
                s = self.param_state(n)
                out[n] = {
                    k: _cpu_copy(s[k]) for k in STATE_KEYS if k in s and (keys is None or k in keys)
                }
                if with_params:
                    out[n]["param"] = _cpu_copy(self.params[self.index[n]])
            return self.step_count, out

    def param_steps(self) -> list[float | None]:
        """Each parameter's state step (None without state), in parameter order, without a
        device sync per parameter (:mod:`.steps`)."""
        with self.lock:
            return self.steps.values(self._live_states())

    def param_step(self, name: str) -> float | None:
        return self.param_steps()[self.index[name]]

    def bias_correction(self, step: float | None = None) -> dict[str, Any]:
        """Bias-correction factors as ``_single_tensor_adam`` computes them (:mod:`.report`)."""
        return report.bias_correction(self, step)

    def summary(self) -> dict[str, Any]:
        return report.summary(self)
