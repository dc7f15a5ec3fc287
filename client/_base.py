"""What the sync and async clients share: request building and response parsing (no I/O).

Each API call is described by a :class:`Call` (method, path, query, body, and how to parse
the answer); :class:`~client.Client` and :class:`~client.AsyncClient` only differ in how they
send it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import torch

from . import codec
from .errors import ProtocolError, error_from_problem
from .protocol import (
    API_PREFIX,
    META_GROUPS,
    META_SPEC,
    META_STEP,
    BiasCorrectionReport,
    StepperSummary,
)

__all__ = ["DEFAULT_URL", "Call", "StepReply", "resolve_url"]

DEFAULT_URL = "http://127.0.0.1:8470"
OCTET = "application/octet-stream"
#: Upload chunk size: httpx sends an iterator of memoryviews without joining it.
CHUNK = 1 << 20


def resolve_url(url: str | None) -> str:
    """Constructor argument > ``ADAMSCOPE_URL`` > ``http://127.0.0.1:8470``."""
    return (url or os.environ.get("ADAMSCOPE_URL") or DEFAULT_URL).rstrip("/")


@dataclass
class StepReply:
    """What a step returns: the stepper's new step and, on request, the new parameters."""

    step: int
    stepped: list[str]
    skipped: list[str]
    params: dict[str, torch.Tensor] | None = None


@dataclass
class Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: list[tuple[str, str]] = field(default_factory=list)
    json_body: Any = None
    body: bytes | None = None
    accept: str = "application/json"

    def headers(self) -> dict[str, str]:
        h = {"accept": self.accept}
        if self.body is not None:
            h["content-type"] = OCTET
            h["content-length"] = str(len(self.body))
        return h

    def chunks(self) -> Iterator[memoryview]:
        assert self.body is not None
        view = memoryview(self.body)
        for i in range(0, len(view), CHUNK):
            yield view[i : i + CHUNK]


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict) or "code" not in problem:
            raise ValueError
    except ValueError:
        problem = {"status": response.status_code, "code": f"http_{response.status_code}",
                   "detail": response.text[:500] or response.reason_phrase}
    raise error_from_problem(problem)


def _tensors(response: httpx.Response) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return codec.decode(response.content)
    except codec.CodecError as e:
        raise ProtocolError(f"server sent an invalid safetensors body: {e}") from None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ProtocolError(f"server sent invalid JSON: {e}") from None


def _path(name: str, *rest: str) -> str:
    return "/".join([f"{API_PREFIX}/steppers/{quote(name, safe='')}", *rest])


def _names(names: Sequence[str] | None, key: str = "name") -> list[tuple[str, str]]:
    return [(key, n) for n in names] if names is not None else []


def _named(params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]
           ) -> list[tuple[str, torch.Tensor]]:
    return list(params.items()) if isinstance(params, Mapping) else list(params)


# ---------------------------------------------------------------------- call builders

def health() -> Call:
    return Call("GET", "/healthz", _json)


def list_steppers() -> Call:
    return Call("GET", f"{API_PREFIX}/steppers",
                lambda r: [StepperSummary.model_validate(s) for s in _json(r)["steppers"]])


def get(name: str) -> Call:
    return Call("GET", _path(name), lambda r: StepperSummary.model_validate(_json(r)))


def create(
    name: str,
    params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    optimizer: str,
    device: str | None,
    groups: Sequence[Mapping[str, Any]] | None,
    hyperparameters: Mapping[str, Any],
) -> Call:
    named = _named(params)
    spec: dict[str, Any] = {
        "name": name,
        "optimizer": optimizer,
        "params": [{"name": n} for n, _ in named],
        "hyperparameters": _jsonable_options(hyperparameters),
    }
    if device is not None:
        spec["device"] = device
    if groups is not None:
        spec["groups"] = [_jsonable_options(g) for g in groups]
    body = codec.encode(dict(named), {META_SPEC: json.dumps(spec)})
    return Call("POST", f"{API_PREFIX}/steppers", lambda r: StepperSummary.model_validate(_json(r)),
                body=body)


def delete(name: str) -> Call:
    return Call("DELETE", _path(name), lambda r: None)


def step(
    name: str,
    grads: Mapping[str, torch.Tensor | None],
    return_params: bool,
    param_groups: Sequence[Mapping[str, Any]] | None,
) -> Call:
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([_jsonable_options(g) for g in param_groups])
    sent = {n: g for n, g in grads.items() if g is not None}
    body = codec.encode(sent, metadata)

    def parse(r: httpx.Response) -> StepReply:
        if r.headers.get("content-type", "").startswith(OCTET):
            tensors, meta = _tensors(r)
            stepped = json.loads(meta.get("adamscope.stepped", "[]"))
            skipped = [n for n in tensors if n not in set(stepped)]
            return StepReply(int(meta[META_STEP]), stepped, skipped, tensors)
        data = _json(r)
        return StepReply(data["step"], data["stepped"], data["skipped"])

    return Call("POST", _path(name, "step"), parse,
                params=[("return_params", "true")] if return_params else [], body=body,
                accept=OCTET if return_params else "application/json")


def get_params(name: str, names: Sequence[str] | None) -> Call:
    return Call("GET", _path(name, "params"), lambda r: _tensors(r)[0],
                params=_names(names), accept=OCTET)


def put_params(name: str, tensors: Mapping[str, torch.Tensor]) -> Call:
    return Call("PUT", _path(name, "params"), _json, body=codec.encode(dict(tensors)))


def get_state(name: str, names: Sequence[str] | None, keys: Sequence[str] | None) -> Call:
    def parse(r: httpx.Response) -> dict[str, dict[str, torch.Tensor]]:
        flat, _ = _tensors(r)
        out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names or []}
        for k, t in flat.items():
            pname, _, key = k.rpartition(".")
            out.setdefault(pname, {})[key] = t
        return out

    return Call("GET", _path(name, "state"), parse,
                params=_names(names) + _names(keys, "key"), accept=OCTET)


def put_state(
    name: str,
    state: Mapping[str, Mapping[str, torch.Tensor]],
    param_groups: Sequence[Mapping[str, Any]] | None,
    replace: bool,
) -> Call:
    flat = {f"{p}.{k}": t for p, entries in state.items() for k, t in entries.items()}
    metadata = {}
    if param_groups is not None:
        metadata[META_GROUPS] = json.dumps([_jsonable_options(g) for g in param_groups])
    return Call("PUT", _path(name, "state"), _json, body=codec.encode(flat, metadata),
                params=[("replace", "true")] if replace else [])


def reset_state(name: str, names: Sequence[str] | None) -> Call:
    return Call("DELETE", _path(name, "state"), _json, params=_names(names))


def set_hyperparameters(name: str, group: int | None, options: Mapping[str, Any]) -> Call:
    body = _jsonable_options(options)
    if group is not None:
        body["group"] = group
    return Call("PATCH", _path(name, "hyperparameters"),
                lambda r: StepperSummary.model_validate(_json(r)), json_body=body)


def bias_correction(name: str, step: float | None) -> Call:
    return Call("GET", _path(name, "bias-correction"),
                lambda r: BiasCorrectionReport.model_validate(_json(r)),
                params=[("step", repr(float(step)))] if step is not None else [])


def _jsonable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON. Tensor-valued ``lr``/``betas`` are refused: PyTorch computes with
    them as tensors (float32 arithmetic), which a float on the wire would not reproduce."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        values = v if isinstance(v, tuple | list) else [v]
        if any(torch.is_tensor(x) for x in values):
            raise TypeError(
                f"a tensor-valued {k} cannot be sent to a remote optimizer bit-exactly; "
                "pass a Python float"
            )
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------- state_dict mapping

OPTION_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
               "capturable", "differentiable", "fused", "decoupled_weight_decay")


def to_state_dict(
    summary: StepperSummary, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Name-keyed remote state -> a PyTorch ``Optimizer.state_dict()`` (index-keyed).

    Indices follow PyTorch's rule: parameters numbered in param-group order.
    """
    order = [n for g in summary.groups for n in g.params]
    index = {n: i for i, n in enumerate(order)}
    packed_state = {index[n]: {k: state[n][k] for k in ("step", "exp_avg", "exp_avg_sq",
                                                          "max_exp_avg_sq") if k in state[n]}
                    for n in order if state.get(n)}
    groups = []
    for g in summary.groups:
        opts = g.model_dump(include=set(OPTION_KEYS))
        opts["betas"] = tuple(opts["betas"])
        groups.append({**opts, "params": [index[n] for n in g.params]})
    return {"state": packed_state, "param_groups": groups}


def from_state_dict(
    summary: StepperSummary, state_dict: Mapping[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """A PyTorch ``state_dict`` -> (name-keyed state, per-group options) for this stepper.

    Saved parameter ids are matched to the stepper's parameters positionally, group by group,
    exactly as ``Optimizer.load_state_dict`` does.
    """
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(summary.groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    id_to_name: dict[Any, str] = {}
    options = []
    for saved, g in zip(saved_groups, summary.groups, strict=True):
        if len(saved["params"]) != len(g.params):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        id_to_name.update(zip(saved["params"], g.params, strict=True))
        options.append({k: saved[k] for k in OPTION_KEYS if k in saved})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for pid, entries in state_dict.get("state", {}).items():
        if pid not in id_to_name:
            continue  # PyTorch ignores state for ids no group names
        state[id_to_name[pid]] = {
            k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float32))
            for k, v in entries.items()
        }
    return state, options
