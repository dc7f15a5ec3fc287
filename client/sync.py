"""The synchronous client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import torch

from . import _base
from ._base import Call, StepReply, resolve_url
from .errors import TransportError
from .protocol import BiasCorrectionReport, StepperSummary

__all__ = ["Client"]


class Client:
    """Talk to an adamscope service; every endpoint, with torch tensors in and out.

    >>> c = Client("http://127.0.0.1:8470")
    >>> c.create("run1", {"w": torch.zeros(3)}, lr=1e-2)
    >>> c.step("run1", {"w": torch.ones(3)}).step
    1

    ``url`` defaults to ``$ADAMSCOPE_URL``, then ``http://127.0.0.1:8470``. Pass
    ``http_client`` to reuse a configured ``httpx.Client`` (its base URL is then used).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 300.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self._owns = http_client is None
        self._http = http_client or httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call) -> Any:
        content = call.chunks() if call.body is not None else None
        try:
            response = self._http.request(
                call.method, call.path, params=tuple(call.params), json=call.json_body,
                content=content,  # type: ignore[arg-type]  # memoryviews are bytes-like
                headers=call.headers(),
            )
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {call.path}: {e!r}") from e
        _base.raise_for_problem(response)
        return call.parse(response)

    # -------------------------------------------------------------------- endpoints

    def health(self) -> dict[str, Any]:
        return self._send(_base.health())  # type: ignore[no-any-return]

    def list(self) -> list[StepperSummary]:
        return self._send(_base.list_steppers())  # type: ignore[no-any-return]

    def get(self, name: str) -> StepperSummary:
        return self._send(_base.get(name))  # type: ignore[no-any-return]

    def create(
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
        return self._send(call)  # type: ignore[no-any-return]

    def delete(self, name: str) -> None:
        self._send(_base.delete(name))

    def step(
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
        return self._send(call)  # type: ignore[no-any-return]

    def get_params(self, name: str, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self._send(_base.get_params(name, names))  # type: ignore[no-any-return]

    def put_params(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._send(_base.put_params(name, tensors))

    def get_state(
        self, name: str, names: Sequence[str] | None = None, keys: Sequence[str] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{param: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}}``."""
        return self._send(_base.get_state(name, names, keys))  # type: ignore[no-any-return]

    def put_state(
        self,
        name: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        replace: bool = False,
    ) -> None:
        """Load state tensors by parameter name (any subset); ``replace`` drops the rest."""
        self._send(_base.put_state(name, state, param_groups, replace))

    def reset_state(self, name: str, names: Sequence[str] | None = None) -> None:
        self._send(_base.reset_state(name, names))

    def set_hyperparameters(
        self, name: str, *, group: int | None = None, **options: Any
    ) -> StepperSummary:
        call = _base.set_hyperparameters(name, group, options)
        return self._send(call)  # type: ignore[no-any-return]

    def bias_correction(self, name: str, step: float | None = None) -> BiasCorrectionReport:
        return self._send(_base.bias_correction(name, step))  # type: ignore[no-any-return]

    def state_dict(self, name: str) -> dict[str, Any]:
        """The stepper's state in ``torch.optim.Adam.state_dict()`` format."""
        summary = self.get(name)
        return _base.to_state_dict(summary, self.get_state(name))

    def load_state_dict(self, name: str, state_dict: Mapping[str, Any]) -> None:
        """Load a ``torch.optim.Adam``/``AdamW`` state_dict (state and group options)."""
        state, options = _base.from_state_dict(self.get(name), state_dict)
        self.put_state(name, state, param_groups=options, replace=True)
