"""The asynchronous client (the twin of :class:`client.Client`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx
import torch

from . import _base
from ._base import Call, StepReply, resolve_url
from .errors import TransportError
from .protocol import BiasCorrectionReport, StepperSummary

__all__ = ["AsyncClient"]


async def _aiter(chunks: Iterator[memoryview]) -> AsyncIterator[memoryview]:
    for chunk in chunks:
        yield chunk


class AsyncClient:
    """Talk to an adamscope service; every endpoint, with torch tensors in and out.

    >>> c = AsyncClient("http://127.0.0.1:8470")
    >>> await c.create("run1", {"w": torch.zeros(3)}, lr=1e-2)
    >>> (await c.step("run1", {"w": torch.ones(3)})).step
    1

    ``url`` defaults to ``$ADAMSCOPE_URL``, then ``http://127.0.0.1:8470``. Pass
    ``http_client`` to reuse a configured ``httpx.AsyncClient`` (its base URL is then used).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 300.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self._owns = http_client is None
        self._http = http_client or httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def close(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: Call) -> Any:
        content = _aiter(call.chunks()) if call.body is not None else None
        try:
            response = await self._http.request(
                call.method, call.path, params=tuple(call.params), json=call.json_body,
                content=content,  # type: ignore[arg-type]  # memoryviews are bytes-like
                headers=call.headers(),
            )
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {call.path}: {e!r}") from e
        _base.raise_for_problem(response)
        return call.parse(response)

    # -------------------------------------------------------------------- endpoints

    async def health(self) -> dict[str, Any]:
        return await self._send(_base.health())  # type: ignore[no-any-return]

    async def list(self) -> list[StepperSummary]:
        return await self._send(_base.list_steppers())  # type: ignore[no-any-return]

    async def get(self, name: str) -> StepperSummary:
        return await self._send(_base.get(name))  # type: ignore[no-any-return]

    async def create(
        self,
        name: str,
        params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
        *,
        optimizer: str = "adam",
        device: str | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
        **hyperparameters: Any,
    ) -> StepperSummary:
        """Create stepper ``name`` owning ``params`` (initial values are uploaded).

        ``hyperparameters`` are ``torch.optim.Adam``'s keywords; ``groups`` are param-group
        dicts ``{"params": [names...], **options}``.
        """
        call = _base.create(name, params, optimizer, device, groups, hyperparameters)
        return await self._send(call)  # type: ignore[no-any-return]

    async def delete(self, name: str) -> None:
        await self._send(_base.delete(name))

    async def step(
        self,
        name: str,
        grads: Mapping[str, torch.Tensor | None],
        *,
        return_params: bool = False,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> StepReply:
        """One Adam step; a name missing from ``grads`` (or mapped to None) does not step.

        ``param_groups`` (one dict of option changes per group) is applied atomically
        before the step, as a scheduler's ``lr`` change would be locally.
        """
        call = _base.step(name, grads, return_params, param_groups)
        return await self._send(call)  # type: ignore[no-any-return]

    async def get_params(
        self, name: str, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return await self._send(_base.get_params(name, names))  # type: ignore[no-any-return]

    async def put_params(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        await self._send(_base.put_params(name, tensors))

    async def get_state(
        self, name: str, names: Sequence[str] | None = None, keys: Sequence[str] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{param: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}}``."""
        return await self._send(_base.get_state(name, names, keys))  # type: ignore[no-any-return]

    async def put_state(
        self,
        name: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> None:
        """Load state tensors by parameter name (any subset); ``replace`` drops the rest."""
        await self._send(_base.put_state(name, state, param_groups, replace))

    async def reset_state(self, name: str, names: Sequence[str] | None = None) -> None:
        await self._send(_base.reset_state(name, names))

    async def set_hyperparameters(
        self, name: str, *, group: int | None = None, **options: Any
    ) -> StepperSummary:
        call = _base.set_hyperparameters(name, group, options)
        return await self._send(call)  # type: ignore[no-any-return]

    async def bias_correction(
        self, name: str, step: float | None = None
    ) -> BiasCorrectionReport:
        return await self._send(_base.bias_correction(name, step))  # type: ignore[no-any-return]

    async def state_dict(self, name: str) -> dict[str, Any]:
        """The stepper's state in ``torch.optim.Adam.state_dict()`` format."""
        summary = await self.get(name)
        return _base.to_state_dict(summary, await self.get_state(name))

    async def load_state_dict(self, name: str, state_dict: Mapping[str, Any]) -> None:
        """Load a ``torch.optim.Adam``/``AdamW`` state_dict (state and group options)."""
        state, options = _base.from_state_dict(await self.get(name), state_dict)
        await self.put_state(name, state, param_groups=options, replace=True)
