"""Client and AsyncClient against the real server: the same scenario, the same answers.

Each scenario is written once as a coroutine and run (with ``asyncio.run``, no pytest
plugin) for both clients; ``call`` awaits only what the async client returns. Results are
checked bit for bit against a local torch.optim.Adam fed the same gradients, and every
rejection must arrive as its typed exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from remote_support import assert_same, assert_tensor_equal, unique

from adamscope.client import AsyncClient, Client
from adamscope.client.errors import (
    AdamscopeError,
    APIStatusError,
    DeviceUnavailableError,
    DtypeMismatchError,
    InvalidHyperparameterError,
    InvalidStateError,
    NotFoundError,
    ShapeMismatchError,
    StepperExistsError,
    StepperNotFoundError,
    TransportError,
    UnknownParameterError,
)

KINDS = ["sync", "async"]
AnyClient = Client | AsyncClient


@contextlib.asynccontextmanager
async def open_client(kind: str, url: str) -> AsyncIterator[AnyClient]:
    if kind == "sync":
        with Client(url) as c:
            yield c
    else:
        async with AsyncClient(url) as ac:
            yield ac


async def call(client: AnyClient, method: str, *args: Any, **kwargs: Any) -> Any:
    """``client.method(*args, **kwargs)``, awaited when the client is async."""
    result = getattr(client, method)(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


async def core_operations(c: AnyClient) -> None:
    name = unique("core")
    values = initial()
    local_params = {n: t.clone().requires_grad_(True) for n, t in values.items()}
    local = torch.optim.Adam(local_params.values(), lr=0.01, betas=(0.9, 0.99), amsgrad=True)

    assert (await call(c, "health"))["status"] == "ok"
    summary = await call(c, "create", name, values, lr=0.01, betas=(0.9, 0.99), amsgrad=True)
    assert (summary.name, summary.optimizer, summary.step) == (name, "adam", 0)
    assert [(p.name, p.shape) for p in summary.params] == [("w", [3, 4]), ("b", [4])]
    assert summary.groups[0].amsgrad is True
    assert name in [s.name for s in await call(c, "list")]

    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        grads: dict[str, torch.Tensor | None] = {
            n: torch.randn(t.shape, generator=gen) for n, t in values.items()
        }
        if i == 2:
            grads["b"] = None  # no step for b, as with p.grad = None
        for n, p in local_params.items():
            p.grad = grads[n]
        local.step()
        reply = await call(c, "step", name, grads, return_params=i % 2 == 1)
        assert reply.step == i + 1
        assert reply.stepped == (["w"] if i == 2 else ["w", "b"])
        assert reply.skipped == (["b"] if i == 2 else [])
        params = reply.params if reply.params is not None else await call(c, "get_params", name)
        for n, p in local_params.items():
            assert_tensor_equal(p.detach(), params[n], n)

    state = await call(c, "get_state", name)
    for n, p in local_params.items():
        assert set(state[n]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, t in local.state[p].items():
            assert_tensor_equal(t, state[n][key], f"{n}.{key}")
    partial = await call(c, "get_state", name, names=["w"], keys=["exp_avg"])
    assert list(partial) == ["w"] and list(partial["w"]) == ["exp_avg"]

    # Bias correction as _single_tensor_adam computes it from each parameter's own step.
    report = await call(c, "bias_correction", name)
    assert report.step == 6
    assert report.groups[0].bias_correction1 == 1 - 0.9**6.0
    for n, p in local_params.items():
        t = local.state[p]["step"].item()
        factors = report.params[n]
        assert factors.step == t == (5.0 if n == "b" else 6.0)
        assert factors.bias_correction1 == 1 - 0.9**t
        assert factors.bias_correction2 == 1 - 0.99**t
        assert factors.step_size == 0.01 / (1 - 0.9**t)
        assert factors.bias_correction2_sqrt == (1 - 0.99**t) ** 0.5
    at = await call(c, "bias_correction", name, step=3)
    assert (at.groups[0].step, at.groups[0].bias_correction1, at.params) == (3.0, 1 - 0.9**3, {})

    # Options between steps.
    summary = await call(c, "set_hyperparameters", name, lr=0.005)
    assert summary.groups[0].lr == 0.005
    local.param_groups[0]["lr"] = 0.005
    grads = {n: torch.ones_like(t) for n, t in values.items()}
    for n, p in local_params.items():
        p.grad = grads[n]
    local.step()
    params = (await call(c, "step", name, grads, return_params=True)).params
    for n, p in local_params.items():
        assert_tensor_equal(p.detach(), params[n], n)
    assert_same(local.state_dict(), await call(c, "state_dict", name))

    # load_state_dict into a second stepper, then both continue identically.
    other = unique("core-load")
    await call(c, "create", other, {n: torch.zeros_like(t) for n, t in values.items()})
    try:
        await call(c, "put_params", other, {n: p.detach() for n, p in local_params.items()})
        await call(c, "load_state_dict", other, local.state_dict())
        assert_same(local.state_dict(), await call(c, "state_dict", other))
        local.step()  # same grads as before
        params = (await call(c, "step", other, grads, return_params=True)).params
        for n, p in local_params.items():
            assert_tensor_equal(p.detach(), params[n], n)

        # reset_state: b restarts at step 0, as if its state had been dropped locally.
        await call(c, "reset_state", other, names=["b"])
        del local.state[local_params["b"]]
        assert await call(c, "get_state", other, names=["b"]) == {"b": {}}
        assert [p.step for p in (await call(c, "get", other)).params] == [8.0, None]
        local.step()
        params = (await call(c, "step", other, grads, return_params=True)).params
        for n, p in local_params.items():
            assert_tensor_equal(p.detach(), params[n], n)
        assert_same(local.state_dict(), await call(c, "state_dict", other))
        assert local.state[local_params["b"]]["step"].item() == 1.0
    finally:
        await call(c, "delete", other)

    await call(c, "delete", name)
    with pytest.raises(StepperNotFoundError):
        await call(c, "get", name)


@pytest.mark.parametrize("kind", KINDS)
def test_core_operations(kind: str, live_server: Any) -> None:
    async def scenario() -> None:
        async with open_client(kind, live_server.url) as c:
            await core_operations(c)

    asyncio.run(scenario())


async def typed_errors(c: AnyClient) -> None:
    missing = unique("missing")
    for method, args in [
        ("get", ()),
        ("delete", ()),
        ("get_params", ()),
        ("get_state", ()),
        ("step", ({"w": torch.ones(1)},)),
        ("bias_correction", ()),
    ]:
        with pytest.raises(StepperNotFoundError) as not_found:
            await call(c, method, missing, *args)
        error = not_found.value
        assert isinstance(error, NotFoundError) and isinstance(error, APIStatusError)
        assert isinstance(error, AdamscopeError)
        assert (error.status, error.code) == (404, "stepper_not_found")
        assert error.problem["type"] == "urn:adamscope:problem:stepper_not_found"
        assert missing in error.detail

    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=-0.5)
    with pytest.raises(InvalidHyperparameterError) as invalid:
        await call(c, "create", unique("bad-lr"), {"w": torch.zeros(2)}, lr=-0.5)
    assert invalid.value.detail == str(torch_error.value) == "Invalid learning rate: -0.5"
    with pytest.raises(DeviceUnavailableError):
        await call(c, "create", unique("bad-dev"), {"w": torch.zeros(2)}, device="tpu")

    name = unique("errors")
    await call(c, "create", name, initial())
    try:
        with pytest.raises(StepperExistsError) as exists:
            await call(c, "create", name, initial())
        assert exists.value.status == 409
        await call(c, "step", name, {n: torch.ones_like(t) for n, t in initial().items()})
        params_before = await call(c, "get_params", name)
        state_before = await call(c, "state_dict", name)

        bad_requests: list[tuple[type[APIStatusError], str, tuple[Any, ...]]] = [
            (ShapeMismatchError, "step", ({"w": torch.ones(4, 3), "b": torch.ones(4)},)),
            (DtypeMismatchError, "step", ({"w": torch.ones(3, 4, dtype=torch.float64)},)),
            (UnknownParameterError, "step", ({"w": torch.ones(3, 4), "nope": torch.ones(1)},)),
            (InvalidStateError, "put_state", ({"w": {"velocity": torch.ones(3, 4)}},)),
            (ShapeMismatchError, "put_params", ({"b": torch.ones(5)},)),
        ]
        for exc_type, method, args in bad_requests:
            with pytest.raises(exc_type) as rejected:
                await call(c, method, name, *args)
            assert rejected.value.status == 422
            # Rejected atomically: nothing changed, not even the valid part of the request.
            after = await call(c, "get_params", name)
            for n, t in params_before.items():
                assert_tensor_equal(t, after[n], n)
            assert_same(state_before, await call(c, "state_dict", name))
            assert (await call(c, "get", name)).step == 1
    finally:
        await call(c, "delete", name)


@pytest.mark.parametrize("kind", KINDS)
def test_typed_errors(kind: str, live_server: Any) -> None:
    async def scenario() -> None:
        async with open_client(kind, live_server.url) as c:
            await typed_errors(c)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_server_raises_transport_error(kind: str) -> None:
    async def scenario(port: int) -> None:
        async with open_client(kind, f"http://127.0.0.1:{port}") as c:
            with pytest.raises(TransportError):
                await call(c, "health")

    # A port held bound but never listening: a connection to it is refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        asyncio.run(scenario(s.getsockname()[1]))
