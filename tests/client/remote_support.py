"""Helpers shared by the client-tier tests: deterministic tensors and exact comparisons.

Every comparison here is exact (``torch.equal`` plus dtype and shape), never ``allclose``:
a remote step must be PyTorch's own step, bit for bit.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adamscope.client import Client, RemoteAdam, RemoteAdamW


def unique(prefix: str) -> str:
    """A stepper name no other test on the shared live server uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_params(
    shapes: Sequence[tuple[int, ...]],
    dtypes: torch.dtype | Sequence[torch.dtype],
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Random leaf tensors (requires_grad) of the given shapes and dtype(s)."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if dtype.is_complex:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        out.append(t.to(device).requires_grad_(True))
    return out


def twin(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Independent copies with the same values (one set for each optimizer)."""
    return [p.detach().clone().requires_grad_(True) for p in params]


def random_grad(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A deterministic gradient like ``p`` (drawn on the CPU, then moved to p's device)."""
    if p.dtype.is_complex:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    else:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    return g.to(p.device)


def set_grads(
    groups: Sequence[Sequence[torch.Tensor]],
    gen: torch.Generator,
    skip: Sequence[int] = (),
) -> None:
    """Give the i-th parameter of every list the same fresh gradient; ``skip`` gets None."""
    for i, same in enumerate(zip(*groups, strict=True)):
        g = None if i in skip else random_grad(same[0], gen)
        for p in same:
            p.grad = None if g is None else g.clone()


def assert_tensor_equal(
    expected: torch.Tensor, actual: torch.Tensor, what: str, *, any_device: bool = False
) -> None:
    """Bit-exact equality, same dtype and shape (and device unless ``any_device``)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if any_device:
        expected, actual = expected.cpu(), actual.cpu()
    else:
        assert actual.device == expected.device, f"{what}: {actual.device} != {expected.device}"
    assert torch.equal(expected, actual), f"{what}: values differ\n{expected}\n{actual}"


def assert_params_equal(
    expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], *, any_device: bool = False
) -> None:
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        assert_tensor_equal(e.detach(), a.detach(), f"param {i}", any_device=any_device)


def assert_same(
    expected: Any, actual: Any, where: str = "state_dict", *, any_device: bool = False
) -> None:
    """Recursive exact equality of two ``Optimizer.state_dict()``-like structures."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual), f"{where}: expected a tensor, got {actual!r}"
        assert_tensor_equal(expected, actual, where, any_device=any_device)
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: expected a mapping, got {actual!r}"
        assert set(actual) == set(expected), (
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        )
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}[{k!r}]", any_device=any_device)
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}[{i}]", any_device=any_device)
    elif _is_number(expected) and _is_number(actual):
        # Group options cross the wire as JSON numbers: PyTorch's int default
        # weight_decay=0 may come back as 0.0, which every Adam path treats alike.
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
    else:
        assert type(actual) is type(expected) and actual == expected, (
            f"{where}: {actual!r} != {expected!r}"
        )


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# ---------------------------------------------------------------------- the parity matrix

#: The three implementations PyTorch has, as keyword arguments.
IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

#: Parameters of every parity run; the last one skips steps (grad None), see ``skipped``.
SHAPES: list[tuple[int, ...]] = [(4, 3), (5,), (), (2, 2)]


def skipped(step: int, n_params: int = len(SHAPES)) -> tuple[int, ...]:
    """The last parameter gets no gradient for the first 4 steps and every third after."""
    return (n_params - 1,) if step < 4 or step % 3 == 0 else ()


@dataclass(frozen=True)
class Case:
    """One parity run: optimizer, implementation, parameter dtypes and options."""

    optimizer: str
    impl: str
    dtypes: tuple[torch.dtype, ...]
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"lr": 1e-2, **IMPLEMENTATIONS[self.impl], **dict(self.options)}

    @property
    def id(self) -> str:
        names = sorted({str(d).removeprefix("torch.") for d in self.dtypes})
        parts = [self.optimizer, self.impl, "+".join(names)]
        opts = dict(self.options)
        parts += [k for k in ("amsgrad", "maximize") if opts.get(k)]
        parts.append(f"wd{opts.get('weight_decay', 'default')}")
        if opts.get("decoupled_weight_decay"):
            parts.append("decoupled")
        if opts.get("capturable"):
            parts.append("capturable")
        return "-".join(parts)


def option_rows(optimizer: str) -> list[dict[str, Any]]:
    """A pairwise covering array of the boolean-ish options.

    Every pair of values of (amsgrad, maximize, weight_decay in {0, 0.1}[, Adam's
    decoupled_weight_decay]) appears in some row: 5 rows for Adam's four factors and 4 for
    AdamW's three, instead of the 16 and 8 of the full product.
    """
    if optimizer == "adam":
        bits = [(0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]
        return [
            {
                "amsgrad": bool(a),
                "maximize": bool(m),
                "weight_decay": 0.1 * w,
                "decoupled_weight_decay": bool(d),
            }
            for a, m, w, d in bits
        ]
    bits3 = [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]
    return [{"amsgrad": bool(a), "maximize": bool(m), "weight_decay": 0.1 * w} for a, m, w in bits3]


def plain_and_all_on(optimizer: str) -> list[dict[str, Any]]:
    """Two rows: every option off, every option on (for the rarer dtypes)."""
    rows = option_rows(optimizer)
    on = {"amsgrad": True, "maximize": True, "weight_decay": 0.1}
    if optimizer == "adam":
        on["decoupled_weight_decay"] = True
    return [rows[0], on]


def cases(
    impls: Sequence[str],
    dtype_sets: Sequence[tuple[torch.dtype, ...]],
    rows: Any,
    extra: Mapping[str, Any] | None = None,
) -> list[Case]:
    """Every optimizer x implementation x dtype set x row of ``rows(optimizer)``."""
    return [
        Case(opt, impl, dtypes, tuple(sorted({**row, **(extra or {})}.items())))
        for opt in ("adam", "adamw")
        for impl in impls
        for dtypes in dtype_sets
        for row in rows(opt)
    ]


#: optimizer name -> (local torch class, remote twin).
OPTIMIZERS: dict[str, tuple[Any, Any]] = {
    "adam": (torch.optim.Adam, RemoteAdam),
    "adamw": (torch.optim.AdamW, RemoteAdamW),
}


def run_parity(
    case: Case,
    client: Client,
    *,
    steps: int = 50,
    device: str = "cpu",
    remote_device: str | None = None,
    **remote_kwargs: Any,
) -> str:
    """``steps`` steps of the local optimizer and of its remote twin: identical throughout.

    Parameters are compared after every step; at the end the local ``state_dict()`` must
    equal both RemoteAdam's and the one :meth:`Client.state_dict` builds from the server.
    """
    local_cls, remote_cls = OPTIMIZERS[case.optimizer]
    dtypes = case.dtypes * len(SHAPES) if len(case.dtypes) == 1 else case.dtypes
    init = make_params(SHAPES, dtypes, seed=0, device=device)
    local_params, remote_params = twin(init), twin(init)
    local = local_cls(local_params, **case.kwargs)
    remote = remote_cls(
        remote_params,
        **case.kwargs,
        client=client,
        name=unique(case.optimizer),
        device=remote_device,
        **remote_kwargs,
    )
    any_device = device != "cpu"  # remote state comes back as CPU tensors
    try:
        lockstep(local, local_params, remote, remote_params, steps, seed=1)
        expected = local.state_dict()
        assert_same(expected, remote.state_dict(), any_device=any_device)
        # The same from the server's side alone (its group options, not RemoteAdam's copy).
        assert_same(expected, client.state_dict(remote.name), any_device=any_device)
        return remote.name
    finally:
        client.delete(remote.name)


def lockstep(
    local: torch.optim.Optimizer,
    local_params: Sequence[torch.Tensor],
    remote: torch.optim.Optimizer,
    remote_params: Sequence[torch.Tensor],
    steps: int,
    seed: int,
    skip_from: int = 0,
) -> None:
    """Step both optimizers ``steps`` times on equal gradients; params equal after each.

    The last parameter skips steps as in :func:`skipped` (from step ``skip_from`` on).
    """
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_grads(
            [local_params, remote_params], gen, skip=skipped(step + skip_from, len(local_params))
        )
        local.step()
        remote.step()
        assert_params_equal(local_params, remote_params)
