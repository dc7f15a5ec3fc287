"""The asynchronous client (the twin of :class:`adamscope.client.Client`)."""

# Long: the async twin of sync.py, mirroring it line for line (one short method per
# endpoint; the requests are built in _calls and _inspection).

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
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

if TYPE_CHECKING:
    from ._checkpoint_transfer import CheckpointFormatName, StepInto
    from .checkpoints import OptimizerCheckpoint, OptimizerKind

__all__ = ["AsyncClient"]

T = TypeVar("T")


async def _aiter(parts: list[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    for part in parts:
        yield part


class AsyncClient:
    """Talk to an adamscope service; every endpoint, with torch tensors in and out.

    >>> c = AsyncClient("http://127.0.0.1:8470")
    >>> await c.create("run1", {"w": torch.zeros(3)}, lr=1e-2)
    >>> (await c.step("run1", {"w": torch.ones(3)})).step
    1

    ``url`` defaults to ``$ADAMSCOPE_URL``, then ``http://127.0.0.1:8470``. Pass
    ``http_client`` to reuse a configured ``httpx.AsyncClient`` (its base URL is then used).
    ``token`` (default ``$ADAMSCOPE_TOKEN``) is sent as ``Authorization: Bearer <token>``
    to a service that has access tokens configured.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 300.0,
        http_client: httpx.AsyncClient | None = None,
        token: str | None = None,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.url = resolve_url(url)
        self.retries = retries
        self.backoff = backoff
        self._owns = http_client is None
        self._http = http_client or httpx.AsyncClient(base_url=self.url, timeout=timeout)
        _base.authorize(self._http, token)

    async def close(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: Call[T]) -> T:
        """Send ``call``, retrying connection failures and 5xx with backoff where that is
        safe (a step's idempotency key is the same on every attempt)."""
        for attempt in range(self.retries + 1):
            try:
                return await self._send_once(call)
            except (TransportError, APIStatusError) as e:
                if attempt == self.retries or not _base.should_retry(call, e):
                    raise
            await asyncio.sleep(_base.retry_delay(attempt, self.backoff))
        raise AssertionError("unreachable")

    async def _send_once(self, call: Call[T]) -> T:
        content = _aiter(call.parts) if call.parts is not None else None
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=tuple(call.params),
                json=call.json_body,
                content=content,  # type: ignore[arg-type]  # memoryviews are bytes-like
                headers=call.headers(),
            )
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {call.path}: {e!r}") from e
        _base.raise_for_problem(response)
        if call.receive is not None and _base.is_tensor_body(response):
            return call.receive(_base.chunk_reader(iter([response.content])))
        return call.parse(response)

    # -------------------------------------------------------------------- endpoints

    async def health(self) -> dict[str, Any]:
        return await self._send(_calls.health())

    async def list(self) -> list[StepperSummary]:
        return await self._send(_calls.list_steppers())

    async def get(self, name: str) -> StepperSummary:
        return await self._send(_calls.get(name))

    async def create(
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
        return await self._send(call)

    async def set_kind(self, name: str, kind: str) -> StepperSummary:
        """Freeze (``"frozen"``: steps refused, edits allowed) or unfreeze (``"hosted"``)."""
        return await self._send(_calls.set_kind(name, kind))

    async def delete(self, name: str) -> None:
        await self._send(_calls.delete(name))

    async def step(
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
        before the step, as a scheduler's ``lr`` change would be locally.
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
        return await self._send(call)

    async def contribute(
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
        """Accumulate mode (see :meth:`adamscope.client.Client.contribute`)."""
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
        return await self._send(call)

    async def commit(self, name: str) -> StepReply:
        """Accumulate mode: apply the pending step with the contributions so far."""
        return await self._send(_calls.commit(name))

    async def get_params(
        self, name: str, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return await self._send(_calls.get_params(name, names))

    async def put_params(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        await self._send(_calls.put_params(name, tensors))

    async def get_state(
        self,
        name: str,
        names: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        with_params: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{param: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}}``; with
        ``with_params`` also ``"param"``, the value read together with that state."""
        call = _calls.get_state(name, names, keys, with_params)
        return await self._send(call)

    async def put_state(
        self,
        name: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> None:
        """Load state tensors by parameter name (any subset); ``replace`` drops the rest."""
        await self._send(_calls.put_state(name, state, param_groups, replace))

    async def reset_state(self, name: str, names: Sequence[str] | None = None) -> None:
        await self._send(_calls.reset_state(name, names))

    async def set_hyperparameters(
        self, name: str, *, group: int | None = None, **options: Any
    ) -> StepperSummary:
        call = _calls.set_hyperparameters(name, group, options)
        return await self._send(call)

    async def bias_correction(self, name: str, step: float | None = None) -> BiasCorrectionReport:
        return await self._send(_calls.bias_correction(name, step))

    async def state_dict(self, name: str) -> dict[str, Any]:
        """The stepper's state in ``torch.optim.Adam.state_dict()`` format."""
        summary = await self.get(name)
        return _state_dict.to_state_dict(summary, await self.get_state(name))

    async def load_state_dict(self, name: str, state_dict: Mapping[str, Any]) -> None:
        """Load a ``torch.optim.Adam``/``AdamW`` state_dict (state and group options)."""
        state, options = _state_dict.from_state_dict(await self.get(name), state_dict)
        await self.put_state(name, state, param_groups=options, replace=True)

    # -------------------------------------------------------------------- checkpoints

    async def _run(self, flow: Generator[Call[Any], Any, T]) -> T:
        """Send each request ``flow`` yields and give it the result (or the error)."""
        call = next(flow)
        while True:
            try:
                result = await self._send(call)
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

    async def import_checkpoint(
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
        """Create stepper ``name`` from an optimizer checkpoint a training job wrote (read
        in a worker thread; see :meth:`Client.import_checkpoint`).

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

        ckpt = await asyncio.to_thread(transfer.read_source, source, format, names, weights, kind)
        flow = transfer.import_flow(
            ckpt, name, step_into, device, _calls.durability_policy(durability), progress
        )
        return await self._run(flow)

    async def export_checkpoint(
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

        ckpt: OptimizerCheckpoint = await self._run(transfer.export_flow(name, progress))
        if path is not None:
            await asyncio.to_thread(transfer.write_checkpoint, ckpt, path, format)
        return ckpt

    # -------------------------------------------------------------------- durability

    async def checkpoint(self, name: str) -> CheckpointInfo:
        """Write the stepper's state to the service's disk now, whatever its policy."""
        return await self._send(_calls.checkpoint(name))

    async def set_durability(
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
        return await self._send(_calls.set_durability(name, body))

    async def snapshot(self, name: str, snap: str | None = None) -> SnapshotInfo:
        """Take a named snapshot of the stepper now (name chosen by the service if None)."""
        return await self._send(_calls.take_snapshot(name, snap))

    async def snapshots(self, name: str) -> builtins.list[SnapshotInfo]:
        """The stepper's snapshots, oldest first."""
        return await self._send(_calls.list_snapshots(name))

    async def restore(self, name: str, snap: str) -> StepperSummary:
        """Roll the stepper back to snapshot ``snap`` (values, state, options and step)."""
        call = _calls.restore_snapshot(name, snap)
        return await self._send(call)

    async def delete_snapshot(self, name: str, snap: str) -> None:
        await self._send(_calls.delete_snapshot(name, snap))

    async def download_snapshot(
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
            async with self._http.stream("GET", url, headers={"accept": OCTET}) as r:
                if not r.is_success:
                    await r.aread()
                    _base.raise_for_problem(r)
                total = int(r.headers.get("content-length", 0)) or None
                with Progress(total, f"{name}/{snap}", progress) as bar, open(part, "wb") as f:
                    async for chunk in r.aiter_bytes(_calls.FILE_CHUNK):
                        await asyncio.to_thread(f.write, chunk)
                        bar.update(len(chunk))
            os.replace(part, target)
        except httpx.TransportError as e:
            part.unlink(missing_ok=True)
            raise TransportError(f"GET {url}: {e!r}") from e
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return target

    async def import_snapshot(
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
        data = await asyncio.to_thread(source.read_bytes)
        url, query = _calls.import_request(name, device)
        try:
            with Progress(len(data), f"upload {source.name}", progress) as bar:
                async with self._http.stream(
                    "POST",
                    url,
                    params=tuple(query),
                    content=_achunks(data, bar),  # type: ignore[arg-type]  # bytes-like
                    headers=_calls.upload_headers(len(data)),
                ) as r:
                    await r.aread()
        except httpx.TransportError as e:
            raise TransportError(f"POST {url}: {e!r}") from e
        _base.raise_for_problem(r)
        return _calls.summary_of(r)

    # -------------------------------------------------------------------- history and events

    async def history(
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
        """The stepper's retained per-step signals (see :meth:`adamscope.client.Client.history`)."""
        call = _inspection.history(name, signal, tensor, since, limit, fmt, first, last, max_points)
        return await self._send(call)

    async def alerts(self, name: str, limit: int | None = None) -> AlertsReport:
        """The stepper's alert rules, which hold now, and its latest alert events."""
        return await self._send(_inspection.alerts(name, limit))

    async def set_alerts(
        self, name: str, rules: Sequence[AlertRule | Mapping[str, Any]] | None
    ) -> AlertsReport:
        """Replace the stepper's alert rules (``None``: back to the defaults)."""
        return await self._send(_inspection.set_alerts(name, rules))

    async def report_loss(self, name: str, step: int | None, loss: float) -> LossRecorded:
        """Record the training loss of ``step`` (None: the stepper's current step)."""
        call = _inspection.report_loss(name, step, loss)
        return await self._send(call)

    async def events(
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
    ) -> AsyncIterator[dict[str, Any]]:
        """The live event stream as an async iterator (see :meth:`.Client.events`)."""
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
            async with self._http.stream(
                "GET", path, params=tuple(params), headers=headers, timeout=timeout
            ) as r:
                if not r.is_success:
                    await r.aread()
                    _base.raise_for_problem(r)
                async for line in r.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise TransportError(f"GET {path}: {e!r}") from e

    # -------------------------------------------------------------------- inspection

    async def stats(
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
        return await self._send(call)

    async def signals(self, name: str) -> dict[str, Any]:
        """The last step's signals: ``{"step", "time", "tensors": {param: {signal: value}},
        "aggregate": {signal: value}, "sample": {param: n}, "estimates": {...}, "groups":
        [{group, step, lr, beta1, beta2, bc1, bc2, step_size}]}``, with ``"faults"`` at a
        step that brought NaN/Inf and ``"first_nonfinite"`` from then on."""
        return await self._send(_inspection.signals(name))

    async def slice(
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
        return await self._send(call)

    async def dry_run(
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
        return await self._send(call)

    async def diff(self, a: str, b: str) -> dict[str, Any]:
        """Name-keyed diff of two steppers or snapshots (``"stepper"`` or
        ``"stepper/snapshot"``): which tensors changed and by how much."""
        return await self._send(_inspection.diff(a, b))


async def _achunks(data: bytes, bar: Progress) -> AsyncIterator[memoryview]:
    for chunk in _calls.progress_chunks(data, bar):
        yield chunk
