"""The synchronous client."""

# Long: one short method per endpoint, each a call built in _calls or _inspection and
# sent; aio.py mirrors it line for line. Split by resource, a client's surface would be
# scattered over modules a user reads to find a method.

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
import torch

from . import _base, _calls, _inspection, _sse, _state_dict
from ._base import Call, DryRunReply, StepReply, resolve_url
from .constants import OCTET
from .errors import APIStatusError, TransportError
from .progress import Progress
from .protocol import (
    AlertRule,
    AlertsReport,
    BiasCorrectionReport,
    CheckpointInfo,
    HistoryReport,
    LossRecorded,
    SnapshotInfo,
    StepperSummary,
)
from .transport import READINTO_EXTENSION, WireTransport

if TYPE_CHECKING:
    from ._checkpoint_transfer import CheckpointFormatName, StepInto
    from .checkpoints import OptimizerCheckpoint, OptimizerKind

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """Talk to an adamscope service; every endpoint, with torch tensors in and out.

    >>> c = Client("http://127.0.0.1:8470")
    >>> c.create("run1", {"w": torch.zeros(3)}, lr=1e-2)
    >>> c.step("run1", {"w": torch.ones(3)}).step
    1

    ``url`` defaults to ``$ADAMSCOPE_URL``, then ``http://127.0.0.1:8470``. Pass
    ``http_client`` to reuse a configured ``httpx.Client`` (its base URL is then used).
    ``token`` (default ``$ADAMSCOPE_TOKEN``) is sent as ``Authorization: Bearer <token>``
    to a service that has access tokens configured.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 300.0,
        http_client: httpx.Client | None = None,
        token: str | None = None,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.url = resolve_url(url)
        self.retries = retries
        self.backoff = backoff
        self._owns = http_client is None
        self._http = http_client or httpx.Client(
            base_url=self.url, timeout=timeout, transport=WireTransport()
        )
        _base.authorize(self._http, token)

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        """Send ``call``, retrying connection failures and 5xx with backoff where that is
        safe (a step's idempotency key is the same on every attempt)."""
        for attempt in range(self.retries + 1):
            try:
                return self._send_once(call)
            except (TransportError, APIStatusError) as e:
                if attempt == self.retries or not _base.should_retry(call, e):
                    raise
            time.sleep(_base.retry_delay(attempt, self.backoff))
        raise AssertionError("unreachable")

    def _send_once(self, call: Call[T]) -> T:
        try:
            with self._http.stream(
                call.method,
                call.path,
                params=tuple(call.params),
                json=call.json_body,
                content=call.parts,  # type: ignore[arg-type]  # memoryviews are bytes-like
                headers=call.headers(),
                extensions=call.extensions(),
            ) as response:
                if call.receive is not None and _base.is_tensor_body(response):
                    readinto = response.extensions.get(READINTO_EXTENSION)
                    return call.receive(readinto or _base.chunk_reader(response.iter_raw()))
                response.read()
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {call.path}: {e!r}") from e
        _base.raise_for_problem(response)
        return call.parse(response)

    # -------------------------------------------------------------------- endpoints

    def health(self) -> dict[str, Any]:
        return self._send(_calls.health())

    def list(self) -> list[StepperSummary]:
        return self._send(_calls.list_steppers())

    def get(self, name: str) -> StepperSummary:
        return self._send(_calls.get(name))

    def create(
        self,
        name: str,
        params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
        *,
        optimizer: str = "adam",
        device: str | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
        durability: str | Mapping[str, Any] | None = None,
        shards: int | None = None,
        **hyperparameters: Any,
    ) -> StepperSummary:
        """Create stepper ``name`` owning ``params`` (initial values are uploaded).

        ``hyperparameters`` are ``torch.optim.Adam``'s keywords; ``groups`` are param-group
        dicts ``{"params": [names...], **options}``; ``durability`` is the policy for writing
        it to disk (``"every_step"``, ``{"mode": "every_n", "n": 100}``, ...; default: the
        service's). ``shards`` (distributed mode only) splits the stepper by parameter
        tensors over that many slots.
        """
        call = _calls.create(
            name,
            params,
            optimizer,
            device,
            groups,
            hyperparameters,
            _calls.durability_policy(durability),
            shards,
        )
        return self._send(call)

    def set_kind(self, name: str, kind: str) -> StepperSummary:
        """Freeze (``"frozen"``: steps refused, edits allowed) or unfreeze (``"hosted"``)."""
        return self._send(_calls.set_kind(name, kind))

    def delete(self, name: str) -> None:
        self._send(_calls.delete(name))

    def step(
        self,
        name: str,
        grads: Mapping[str, torch.Tensor | None],
        *,
        return_params: bool = False,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        only_stepped: bool = False,
        into: Mapping[str, torch.Tensor] | None = None,
        wire_dtype: torch.dtype | None = None,
        key: str | None = None,
        expected_step: int | None = None,
    ) -> StepReply:
        """One Adam step; a name missing from ``grads`` (or mapped to None) does not step.

        ``param_groups`` (one dict of option changes per group) is applied atomically
        before the step, as a scheduler's ``lr`` change would be locally. With
        ``return_params`` the new values come back (``only_stepped``: only those this step
        changed); a tensor in ``into`` with the same name, shape and dtype receives its new
        values in place, straight from the socket. ``wire_dtype`` (``torch.bfloat16`` or
        ``torch.float16``) halves the bytes both ways and is LOSSY: gradients are rounded
        before the step and the returned parameters are rounded copies of the stepper's.
        """
        call = _calls.step(
            name,
            grads,
            return_params,
            param_groups,
            into,
            only_stepped,
            wire_dtype,
            key,
            expected_step,
        )
        return self._send(call)

    def contribute(
        self,
        name: str,
        grads: Mapping[str, torch.Tensor | None],
        *,
        worker: int,
        contributors: int,
        wait: float = 0.0,
        return_params: bool = False,
        into: Mapping[str, torch.Tensor] | None = None,
        key: str | None = None,
    ) -> StepReply:
        """Accumulate mode: worker ``worker`` of ``contributors`` sends its gradients for the
        next step, applied (with the mean gradient) once all have contributed. ``wait``
        seconds to block for that; ``reply.applied`` is False if it has not happened yet.
        Retried contributions count once."""
        call = _calls.step(
            name,
            grads,
            return_params,
            None,
            into,
            False,
            None,
            key,
            None,
            (worker, contributors, wait),
        )
        return self._send(call)

    def commit(self, name: str) -> StepReply:
        """Accumulate mode: apply the pending step with the contributions so far."""
        return self._send(_calls.commit(name))

    def get_params(
        self,
        name: str,
        names: Sequence[str] | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Parameter values; those named in ``into`` are written into its tensors in place."""
        return self._send(_calls.get_params(name, names, into))

    def put_params(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._send(_calls.put_params(name, tensors))

    def get_state(
        self,
        name: str,
        names: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        with_params: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{param: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}}``; with
        ``with_params`` also ``"param"``, the value read together with that state."""
        call = _calls.get_state(name, names, keys, with_params)
        return self._send(call)

    def put_state(
        self,
        name: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> None:
        """Load state tensors by parameter name (any subset); ``replace`` drops the rest."""
        self._send(_calls.put_state(name, state, param_groups, replace))

    def reset_state(self, name: str, names: Sequence[str] | None = None) -> None:
        self._send(_calls.reset_state(name, names))

    def set_hyperparameters(
        self, name: str, *, group: int | None = None, **options: Any
    ) -> StepperSummary:
        call = _calls.set_hyperparameters(name, group, options)
        return self._send(call)

    def bias_correction(self, name: str, step: float | None = None) -> BiasCorrectionReport:
        return self._send(_calls.bias_correction(name, step))

    def state_dict(self, name: str) -> dict[str, Any]:
        """The stepper's state in ``torch.optim.Adam.state_dict()`` format."""
        summary = self.get(name)
        return _state_dict.to_state_dict(summary, self.get_state(name))

    def load_state_dict(self, name: str, state_dict: Mapping[str, Any]) -> None:
        """Load a ``torch.optim.Adam``/``AdamW`` state_dict (state and group options)."""
        state, options = _state_dict.from_state_dict(self.get(name), state_dict)
        self.put_state(name, state, param_groups=options, replace=True)

    # -------------------------------------------------------------------- checkpoints

    def _run(self, flow: Generator[Call[Any], Any, T]) -> T:
        """Send each request ``flow`` yields and give it the result (or the error)."""
        call = next(flow)
        while True:
            try:
                result = self._send(call)
            except Exception as e:
                try:
                    call = flow.throw(e)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                call = flow.send(result)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def import_checkpoint(
        self,
        source: str | os.PathLike[str] | OptimizerCheckpoint,
        name: str,
        *,
        format: CheckpointFormatName = "auto",
        step_into: StepInto = "hosted",
        names: Sequence[str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        kind: OptimizerKind | None = None,
        device: str | None = None,
        durability: str | Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> StepperSummary:
        """Create stepper ``name`` from an optimizer checkpoint a training job wrote.

        ``source`` is a path (a DCP directory, a Hugging Face Trainer or Accelerate
        directory, a ``torch.save``d optimizer ``state_dict``; ``format`` ``"auto"`` tells
        them apart) or an :class:`~adamscope.client.checkpoints.OptimizerCheckpoint`
        already read (and perhaps edited). It is read here, never by the service, with
        ``torch.load(weights_only=True)`` only. ``names``, ``weights`` and ``kind`` help
        name the parameters of a bare ``state_dict`` (see :func:`read_checkpoint`).

        ``step_into="frozen"`` keeps it as evidence: steps are refused (409
        ``stepper_frozen``), reads, statistics, snapshots, diffs and edits work;
        ``"hosted"`` can be stepped (e.g. by ``RemoteAdam(..., name=name)``). The stepper
        starts at the checkpoint's training step; each parameter keeps its Adam ``step``.
        """
        from . import _checkpoint_transfer as transfer  # torch.distributed: imported on use

        ckpt = transfer.read_source(source, format, names, weights, kind)
        flow = transfer.import_flow(
            ckpt, name, step_into, device, _calls.durability_policy(durability), progress
        )
        return self._run(flow)  # type: ignore[no-any-return]

    def export_checkpoint(
        self,
        name: str,
        path: str | os.PathLike[str] | None = None,
        *,
        format: Literal["dcp", "torch"] = "torch",
        progress: bool | None = None,
    ) -> OptimizerCheckpoint:
        """Read stepper ``name`` as an optimizer checkpoint and, given ``path``, write it
        where a training job loads it: ``"torch"`` writes ``optimizer.pt`` (PyTorch's
        ``state_dict`` with ``param_names``) and ``model.safetensors`` into directory
        ``path``; ``"dcp"`` a ``torch.distributed.checkpoint`` directory in the layout of
        ``get_state_dict`` (``{"model": ..., "optim": ...}``). Returns the checkpoint."""
        from . import _checkpoint_transfer as transfer

        ckpt: OptimizerCheckpoint = self._run(transfer.export_flow(name, progress))
        if path is not None:
            transfer.write_checkpoint(ckpt, path, format)
        return ckpt

    # -------------------------------------------------------------------- durability

    def checkpoint(self, name: str) -> CheckpointInfo:
        """Write the stepper's state to the service's disk now, whatever its policy."""
        return self._send(_calls.checkpoint(name))

    def set_durability(
        self,
        name: str,
        policy: str | Mapping[str, Any],
        *,
        n: int | None = None,
        seconds: float | None = None,
    ) -> StepperSummary:
        """Change when the stepper is written to disk: ``"every_step"``, ``"every_n"`` (with
        ``n``), ``"interval"`` (with ``seconds``) or ``"manual"``."""
        body = _calls.durability_policy(policy, n, seconds)
        assert body is not None
        return self._send(_calls.set_durability(name, body))

    def snapshot(self, name: str, snap: str | None = None) -> SnapshotInfo:
        """Take a named snapshot of the stepper now (name chosen by the service if None)."""
        return self._send(_calls.take_snapshot(name, snap))

    def snapshots(self, name: str) -> builtins.list[SnapshotInfo]:
        """The stepper's snapshots, oldest first."""
        return self._send(_calls.list_snapshots(name))

    def restore(self, name: str, snap: str) -> StepperSummary:
        """Roll the stepper back to snapshot ``snap`` (values, state, options and step)."""
        return self._send(_calls.restore_snapshot(name, snap))

    def delete_snapshot(self, name: str, snap: str) -> None:
        self._send(_calls.delete_snapshot(name, snap))

    def download_snapshot(
        self,
        name: str,
        snap: str,
        path: str | os.PathLike[str],
        *,
        progress: bool | None = None,
    ) -> Path:
        """Save snapshot ``snap`` as a file (streamed to disk; a progress bar on stderr
        when it is a terminal, or with ``progress=True``). Returns the path."""
        target = Path(path)
        part = target.with_name(target.name + ".part")
        url = _calls.snapshot_file_path(name, snap)
        try:
            with self._http.stream("GET", url, headers={"accept": OCTET}) as r:
                if not r.is_success:
                    r.read()
                    _base.raise_for_problem(r)
                total = int(r.headers.get("content-length", 0)) or None
                with Progress(total, f"{name}/{snap}", progress) as bar, open(part, "wb") as f:
                    for chunk in r.iter_bytes(_calls.FILE_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            os.replace(part, target)
        except httpx.TransportError as e:
            part.unlink(missing_ok=True)
            raise TransportError(f"GET {url}: {e!r}") from e
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return target

    def import_snapshot(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        device: str | None = None,
        progress: bool | None = None,
    ) -> StepperSummary:
        """Create a stepper from a snapshot or checkpoint file (under ``name``, default the
        file's stepper name); a progress bar as for :meth:`download_snapshot`."""
        source = Path(path)
        data = source.read_bytes()
        url, query = _calls.import_request(name, device)
        try:
            with (
                Progress(len(data), f"upload {source.name}", progress) as bar,
                self._http.stream(
                    "POST",
                    url,
                    params=tuple(query),
                    content=_calls.progress_chunks(data, bar),  # type: ignore[arg-type]
                    headers=_calls.upload_headers(len(data)),
                ) as r,
            ):
                r.read()
        except httpx.TransportError as e:
            raise TransportError(f"POST {url}: {e!r}") from e
        _base.raise_for_problem(r)
        return _calls.summary_of(r)

    # -------------------------------------------------------------------- history and events

    def history(
        self,
        name: str,
        signal: str | Sequence[str] | None = None,
        tensor: str | Sequence[str] | None = None,
        *,
        since: int | None = None,
        limit: int | None = None,
        fmt: str = "json",
        first: int | None = None,
        last: int | None = None,
        max_points: int | None = None,
    ) -> HistoryReport | str:
        """The stepper's retained per-step signals: the aggregate's time series, plus those
        of ``tensor`` (names, or ``"*"`` for all), of ``signal`` (default all), for steps
        after ``since``, the last ``limit``. ``fmt="csv"`` returns the CSV text.

        ``first``/``last``/``max_points`` ask for the whole run instead (steps ``first`` to
        ``last``, default all, from the downsampled tiers as well): at most ``max_points``
        points per series (default 1,000), each with its mean, min and max."""
        call = _inspection.history(name, signal, tensor, since, limit, fmt, first, last, max_points)
        return self._send(call)

    def alerts(self, name: str, limit: int | None = None) -> AlertsReport:
        """The stepper's alert rules, which hold now, and its latest alert events."""
        return self._send(_inspection.alerts(name, limit))

    def set_alerts(
        self, name: str, rules: Sequence[AlertRule | Mapping[str, Any]] | None
    ) -> AlertsReport:
        """Replace the stepper's alert rules (``None``: back to the defaults)."""
        return self._send(_inspection.set_alerts(name, rules))

    def report_loss(self, name: str, step: int | None, loss: float) -> LossRecorded:
        """Record the training loss of ``step`` (None: the stepper's current step) in the
        stepper's history; NaN and Inf are recorded as such."""
        return self._send(_inspection.report_loss(name, step, loss))

    def events(
        self,
        stepper: str | Sequence[str] | None = None,
        *,
        tensors: Sequence[str] | None = None,
        replay: int = 0,
        last_event_id: str | None = None,
        heartbeat: float | None = None,
        max_events: int | None = None,
        duration: float | None = None,
        heartbeats: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The live event stream (Server-Sent Events) as dicts ``{"event", "id", "data"}``:
        ``open`` first, then ``step`` events (``data``: stepper, step, seq, time, aggregate
        and per-tensor signals, alerts), ``loss`` and ``dropped`` events; with
        ``heartbeats`` also ``{"event": "heartbeat"}`` for each keep-alive.

        ``replay`` sends the last N retained step events of each stepper first;
        ``last_event_id`` resumes after an event received before. The stream ends after
        ``max_events`` step events or ``duration`` seconds, or when the iterator is closed
        (``contextlib.closing`` or ``break``)."""
        path, params, headers = _sse.events_request(
            stepper, tensors, replay, last_event_id, heartbeat, max_events, duration
        )
        base = self._http.timeout
        timeout = httpx.Timeout(
            base.connect,
            read=max(base.read or 0, 4 * (heartbeat or 15)),
            write=base.write,
            pool=base.pool,
        )
        parser = _sse.SSEParser(heartbeats)
        try:
            with self._http.stream(
                "GET", path, params=tuple(params), headers=headers, timeout=timeout
            ) as r:
                if not r.is_success:
                    r.read()
                    _base.raise_for_problem(r)
                for line in r.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise TransportError(f"GET {path}: {e!r}") from e

    # -------------------------------------------------------------------- inspection

    def stats(
        self,
        name: str,
        names: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        *,
        quantiles: Sequence[float] | None = None,
        bins: int = 32,
        hist_range: tuple[float, float] | None = None,
        log: bool = False,
        log_range: tuple[float, float] | None = None,
        aggregate: bool = True,
    ) -> dict[str, Any]:
        """Statistics (norm, moments, extremes, NaN/Inf/zero counts, quantiles, histograms)
        of ``keys`` (``param``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``m_hat``,
        ``v_hat``, ``lr_eff``, ``update``) per parameter and aggregated, computed where the
        state lives: ``{"step", "tensors": {param: {key: stats}}, "aggregate": {key: stats},
        "missing": [...]}``."""
        call = _inspection.stats(
            name, names, keys, quantiles, bins, hist_range, log, log_range, aggregate
        )
        return self._send(call)

    def signals(self, name: str) -> dict[str, Any]:
        """The last step's signals: ``{"step", "time", "tensors": {param: {signal: value}},
        "aggregate": {signal: value}, "sample": {param: n}, "estimates": {...}, "groups":
        [{group, step, lr, beta1, beta2, bc1, bc2, step_size}]}``, with ``"faults"`` at a
        step that brought NaN/Inf and ``"first_nonfinite"`` from then on."""
        return self._send(_inspection.signals(name))

    def slice(
        self,
        name: str,
        param: str,
        key: str = "param",
        *,
        index: str | int | None = None,
        rows: str | None = None,
    ) -> torch.Tensor:
        """A selection of one tensor or view: ``index`` numpy-style (``3``, ``"0:4"``,
        ``"2,1:10:2"``) or ``rows`` (``"a:b"`` over the first dimension)."""
        call = _inspection.slice_tensor(name, param, key, index, rows)
        return self._send(call)

    def dry_run(
        self,
        name: str,
        grads: Mapping[str, torch.Tensor],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        return_update: bool = False,
        quantiles: Sequence[float] | None = None,
        bins: int = 32,
        log: bool = False,
    ) -> DryRunReply:
        """What a step with ``grads`` would do, without doing it: statistics of the update
        and gradients and the step's signals; with ``return_update`` also the would-be
        update, parameter values and state."""
        call = _inspection.dry_run(name, grads, param_groups, return_update, quantiles, bins, log)
        return self._send(call)

    def diff(self, a: str, b: str) -> dict[str, Any]:
        """Name-keyed diff of two steppers or snapshots (``"stepper"`` or
        ``"stepper/snapshot"``): which tensors changed and by how much."""
        return self._send(_inspection.diff(a, b))
