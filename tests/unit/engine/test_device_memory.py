"""Device memory (service.engine.memory and the stepper's use of it): an out-of-memory error
is a DeviceOutOfMemory (507) that changed nothing, or says ``partial`` when PyTorch's update
had begun; batched host copies; releasing PyTorch's caches; the capturable warning.

No GPU runs here: the out-of-memory error PyTorch raises (``torch.OutOfMemoryError``) is
injected where the allocation happens (PyTorch's own lazy state initialization, its
foreach temporaries, the parameters' placement), and the rest of the step is real.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from adamscope.service.engine import Stepper
from adamscope.service.engine import stepper as stepper_module
from adamscope.service.engine.errors import DeviceOutOfMemory, InvalidHyperparameter
from adamscope.service.engine.memory import is_out_of_memory, release_cached, stage_on_host
from adamscope.service.engine.options import quiet_capturable, validate_options
from adamscope.service.engine.steps import StepMirror
from adamscope.service.inspect.signals import attach_signals

CPU = torch.device("cpu")
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB"


def fail_on(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int = 1) -> list[int]:
    """Make ``owner.name`` raise torch.OutOfMemoryError from its ``call``-th call on."""
    original = getattr(owner, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= call:
            raise torch.OutOfMemoryError(OOM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def make(**options: Any) -> Stepper:
    s = Stepper(
        "s",
        "adam",
        CPU,
        [("a", torch.linspace(-1, 1, 6)), ("b", torch.ones(2, 3))],
        {"lr": 0.1, **options},
    )
    s.steps = StepMirror(mirror_cpu=True)  # as a GPU stepper's steps are mirrored
    attach_signals(s)
    return s


def snapshot(s: Stepper) -> tuple[Any, ...]:
    _, state = s.get_state(with_params=True)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
    return (
        s.step_count,
        {n: {k: t.tolist() for k, t in d.items()} for n, d in state.items()},
        repr(groups),
    )


def grads(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a": torch.linspace(0.5, 1, 6) * scale, "b": torch.full((2, 3), -0.25 * scale)}


@pytest.fixture
def reference() -> Callable[[Stepper, int], None]:
    """Check a stepper against torch.optim.Adam stepped with the same gradients."""

    def check(s: Stepper, steps: int) -> None:
        params = [torch.linspace(-1, 1, 6).requires_grad_(), torch.ones(2, 3).requires_grad_()]
        opts = {k: v for k, v in s.optimizer.param_groups[0].items() if k != "params"}
        local = torch.optim.Adam(params, **opts)
        for i in range(steps):
            for p, g in zip(params, grads(i + 1).values(), strict=True):
                p.grad = g
            local.step()
        for p, mine in zip(params, s.params, strict=True):
            assert torch.equal(p.detach(), mine.detach())

    return check


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_a_first_step_whose_state_does_not_fit_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, impl: dict[str, Any], reference: Callable[[Stepper, int], None]
) -> None:
    """PyTorch creates a first step's state (zeros_like per moment) before it updates
    anything: the second moment failing leaves a half-made state, which is undone."""
    s = make(**impl)
    before = snapshot(s)
    calls = fail_on(monkeypatch, torch, "zeros_like", call=2)
    with pytest.raises(DeviceOutOfMemory) as info:
        s.step(grads(1))
    assert calls[0] == 2  # the injected failure happened where PyTorch allocates
    assert info.value.code == "device_out_of_memory"
    assert info.value.extra == {"partial": False} and "nothing was changed" in info.value.detail
    assert OOM in info.value.detail
    assert snapshot(s) == before
    monkeypatch.undo()
    for i in range(3):
        s.step(grads(i + 1))
    reference(s, 3)


def test_an_update_that_ran_out_part_way_says_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    """foreach allocates its sqrt temporaries after it updated the moments: that cannot be
    undone, and the error says so."""
    s = make(foreach=True)
    s.step(grads(1))
    version = s.version
    fail_on(monkeypatch, torch, "_foreach_sqrt")
    with pytest.raises(DeviceOutOfMemory) as info:
        s.step(grads(2))
    assert info.value.extra == {"partial": True} and "partly updated" in info.value.detail
    assert s.step_count == 1 and s.version > version  # readers see that something changed


def test_an_unmirrored_interruption_is_reported_as_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a known step to compare (a CPU step not mirrored) the stepper cannot tell:
    it says partial rather than claim nothing changed."""
    s = make(foreach=True)
    s.steps = StepMirror()
    s.step(grads(1))
    fail_on(monkeypatch, torch, "_foreach_sqrt")
    with pytest.raises(DeviceOutOfMemory) as info:
        s.step(grads(2))
    assert info.value.extra == {"partial": True}


def test_options_changed_by_a_failed_step_are_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make()
    s.step(grads(1))
    before = snapshot(s)
    fail_on(monkeypatch, torch.optim.Adam, "step")
    with pytest.raises(DeviceOutOfMemory) as info:
        s.step(grads(2), [{"lr": 0.5, "amsgrad": False}])
    assert info.value.extra == {"partial": False}
    assert snapshot(s) == before


def test_a_dry_run_that_does_not_fit_is_507_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from adamscope.service.inspect.dryrun import dry_run

    s = make()
    s.step(grads(1))
    before = snapshot(s)
    fail_on(monkeypatch, torch.optim.Adam, "step")
    with pytest.raises(DeviceOutOfMemory, match="dry run of 's'"):
        dry_run(s, grads(2))
    assert snapshot(s) == before


def test_parameters_that_do_not_fit_create_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on(monkeypatch, stepper_module, "_placed", call=2)
    with pytest.raises(DeviceOutOfMemory) as info:
        make()
    assert "placing the parameters of 's'" in info.value.detail


def test_an_option_probe_that_does_not_fit_is_not_an_invalid_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fail_on(monkeypatch, torch.optim.Adam, "step")
    with pytest.raises(DeviceOutOfMemory):
        validate_options("adam", {"lr": 0.1, "foreach": True})


def test_loads_that_do_not_fit_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make()
    s.step(grads(1))
    before = snapshot(s)
    fail_on(monkeypatch, torch.optim.Adam, "load_state_dict")
    with pytest.raises(DeviceOutOfMemory):
        s.set_hyperparameters({"fused": True})  # a placement change: a state load
    _, state = s.get_state()
    with pytest.raises(DeviceOutOfMemory):
        s.put_state(state)
    assert snapshot(s) == before


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (torch.OutOfMemoryError(OOM), True),
        (torch.cuda.OutOfMemoryError(OOM), True),
        (RuntimeError("CUDA error: out of memory"), True),  # a failed cudaHostAlloc
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_out_of_memory(error: BaseException, oom: bool) -> None:
    assert is_out_of_memory(error) is oom


# ---------------------------------------------------------------------- host copies


def test_device_tensors_come_to_the_host_in_one_batch() -> None:
    """Every copy lands in one buffer (aligned for every dtype), then one wait."""
    tensors = {
        "p": torch.randn(5, 3),
        "step": torch.tensor(7.0),
        "h": torch.randn(3).to(torch.float16),
        "c": torch.randn(2, dtype=torch.complex64),
        "empty": torch.empty(0, 4),
        "kept": torch.ones(2),
    }
    waits: list[int] = []
    out = stage_on_host(
        tensors,
        moved=lambda t: t.dim() != 1 or t.dtype != torch.float32,
        pin=False,
        wait=lambda: waits.append(1),
    )
    assert waits == [1]
    assert out["kept"] is tensors["kept"]
    storages = {out[k].untyped_storage().data_ptr() for k in ("p", "step", "h", "c")}
    assert len(storages) == 1
    for k, t in tensors.items():
        assert torch.equal(out[k], t) and out[k].dtype == t.dtype and out[k].shape == t.shape


def test_nothing_to_move_is_not_copied() -> None:
    t = torch.ones(3)
    out = stage_on_host({"x": t}, wait=lambda: pytest.fail("no copy, no wait"))
    assert out["x"] is t


# ---------------------------------------------------------------------- releasing


def test_a_deleted_steppers_buffers_go(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make()
    s.grad_buffer("a")
    s.grad_buffer("b", torch.bfloat16)
    s.step(grads(1))
    released: list[torch.device] = []
    monkeypatch.setattr(stepper_module, "release_cached", released.append)
    s.release_buffers()
    assert s.buffers.staging == {} and s.buffers.device_grads == {} and s.buffers.host_mirrors == {}
    assert released == [CPU]


@pytest.fixture
def cuda_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A process that initialized CUDA, as far as release_cached can tell; records which
    of PyTorch's caches it empties."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("device"))
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append("host"))
    yield calls


def test_releasing_empties_the_device_and_the_page_locked_caches(cuda_host: list[str]) -> None:
    release_cached(torch.device("cuda", 0))
    assert cuda_host == ["device", "host"]
    release_cached(CPU)
    assert cuda_host == ["device", "host"]  # a CPU stepper has no caches to hand back


# ---------------------------------------------------------------------- capturable warning


class _NotCapturing:
    def is_capturing(self) -> bool:
        return False


@pytest.fixture
def accelerator_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizer.step's graph-capture health check as it runs where CUDA is available."""
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda")
    )
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *a, **k: _NotCapturing())


def _capturable_step(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    with pytest.raises(AssertionError, match="If capturable=True"):
        opt.step()  # the CPU cannot step capturable: PyTorch says so after the check


def test_an_optimizer_that_lost_its_flag_warns_on_a_cuda_host(accelerator_host: None) -> None:
    """The simulation reaches PyTorch's warning: an optimizer rebuilt from its state
    (deepcopy) has lost the per-instance flag and warns, which filterwarnings=error turns
    into a failed step; with the service's flag set it does not."""
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)], capturable=True)
    lost = copy.deepcopy(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as the suite's configuration did before its filter
        with pytest.raises(UserWarning, match="constructed with capturable=True"):
            lost.step()
        quiet_capturable(lost)
        _capturable_step(lost)


def test_the_service_never_meets_the_capturable_warning(accelerator_host: None) -> None:
    """Options validation steps a capturable probe: on a CUDA host it must answer with
    PyTorch's placement error (422), never with the warning (500)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidHyperparameter, match="If capturable=True"):
            validate_options("adam", {"lr": 0.1, "capturable": True})
        s = make()
        with pytest.raises(InvalidHyperparameter, match="If capturable=True"):
            s.set_hyperparameters({"capturable": True})
        s.set_hyperparameters({"fused": True})  # a state load: a new optimizer state
        for opt in (s.optimizer,):
            assert opt._warned_capturable_if_run_uncaptured is True


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_a_first_step_the_gpu_cannot_hold_is_refused_before_anything_changes() -> None:
    """Real CUDA memory: the allocator is limited to the parameters and their gradient
    copy plus a little, so the state a first step would create does not fit; the reserve
    before the step fails, and nothing changed. With the limit lifted, the step is
    PyTorch's."""
    device = torch.device("cuda")
    n = 16 * 2**20  # 64 MiB of float32
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    s = Stepper("big", "adam", device, [("w", torch.zeros(n))], {"lr": 0.1, "fused": True})
    g = {"w": torch.ones(n)}
    s.buffers.on_device("w", s.param("w"), g["w"])  # the gradient copy, as the step makes it first
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(device).total_memory
    allowed = torch.cuda.memory_reserved(device) + 4 * n  # room for one more P, not 2P + 8
    torch.cuda.set_per_process_memory_fraction(allowed / total, device)
    try:
        with pytest.raises(DeviceOutOfMemory) as info:
            s.step(g)
        assert info.value.extra == {"partial": False}
        assert s.step_count == 0 and not s.optimizer.state
        assert torch.equal(s.params[0].detach().cpu(), torch.zeros(n))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    s.step(g)
    local = torch.zeros(n, device=device, requires_grad=True)
    opt = torch.optim.Adam([local], lr=0.1, fused=True)
    local.grad = torch.ones(n, device=device)
    opt.step()
    assert torch.equal(local.detach(), s.params[0].detach())


@pytest.mark.gpu
def test_a_gpu_steppers_checkpoint_is_one_batched_copy() -> None:
    from adamscope.service.engine import checkpoint

    s = Stepper(
        "c",
        "adam",
        torch.device("cuda"),
        [("w", torch.randn(300, 7)), ("b", torch.randn(7))],
        {"lr": 0.1, "capturable": True, "amsgrad": True},
    )
    for _ in range(3):
        s.step({"w": torch.randn(300, 7), "b": torch.randn(7)})
    restored = checkpoint.build(checkpoint.decode(checkpoint.encode(s).data), torch.device("cpu"))
    _, mine = s.get_state(with_params=True)
    _, theirs = restored.get_state(with_params=True)
    for n in s.names:
        for k, t in mine[n].items():
            assert torch.equal(t, theirs[n][k]), (n, k)


@pytest.mark.gpu
def test_a_deleted_gpu_steppers_cached_memory_is_handed_back() -> None:
    """Its gradient copy (32 MiB) and the cached blocks of its step's temporaries go back
    to the driver; its page-locked reply mirror goes too."""
    s = Stepper("r", "adam", torch.device("cuda"), [("w", torch.zeros(8 * 2**20))], {})
    s.step({"w": torch.ones(8 * 2**20)})
    s.host_params(["w"])
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    s.release_buffers()
    assert torch.cuda.memory_reserved() <= reserved - 32 * 2**20
    assert s.buffers.host_mirrors == {} and s.buffers.device_grads == {}
