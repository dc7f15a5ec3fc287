"""Checkpoints training jobs wrote, imported into a real server and exported back (issue 16).

Real parts only: a 2-rank FSDP2 job saving DCP, ``torch.save`` of an AdamW ``state_dict``,
a Hugging Face ``Trainer`` run of a tiny random Llama (the session fixtures of
tests/conftest.py), a real uvicorn on 127.0.0.1, and the clients and CLI a user runs. Every
state tensor is compared bit for bit (``torch.equal`` and dtype) with the job's own.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpoint_local_job import TinyNet, make_optimizer, named_state, train
from checkpoint_support import HFRun, assert_state_equal, load_full
from conftest import LiveServer
from remote_support import unique
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from adamscope.client import AsyncClient, Client, RemoteAdamW
from adamscope.client.checkpoints import UnsafeCheckpointError, read_checkpoint
from adamscope.client.errors import StepperFrozenError, StepperNotFoundError
from adamscope.service.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(live_server: LiveServer) -> Any:
    with Client(live_server.url) as c:
        yield c


def remote_state(c: Client, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state by name, values by name) of a stepper, read in one consistent request."""
    both = c.get_state(name, with_params=True)
    values = {n: s.pop("param") for n, s in both.items()}
    return {n: s for n, s in both.items() if s}, values


def saved_job(tmp_path: Path, steps: int, *, named: bool = True) -> tuple[TinyNet, Any]:
    """A local AdamW job (two groups, amsgrad in one) after ``steps`` steps, saved the
    usual way: ``optim.pt`` (``torch.save(optimizer.state_dict())``) and ``model.pt``.
    Without ``named`` the state has no ``param_names`` and its groups keep the model's
    order, so the names come from ``model.pt`` by position (shape-checked)."""
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = make_optimizer(model, named=named, layout="decay" if named else "prefix")
    train(model, optimizer, range(1, steps + 1))
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return model, optimizer


# ---------------------------------------------------------------------- imports, bit-exact


@pytest.mark.parametrize("layout", ["dcp", "dcp_flat"])
def test_fsdp2_dcp_imports_bit_exactly(fsdp_run: Path, client: Client, layout: str) -> None:
    values, state, _ = load_full(fsdp_run / "full_3.safetensors")
    name = unique("dcp")
    s = client.import_checkpoint(fsdp_run / layout, name, progress=False)
    assert (s.kind, s.step, s.optimizer) == ("hosted", 3, "adamw")
    got_state, got_values = remote_state(client, name)
    assert assert_state_equal(got_state, state) == 8 * 3 + 4  # 8 tensors, 4 amsgrad
    assert got_values.keys() == values.keys()
    for n, v in values.items():
        assert torch.equal(got_values[n], v) and got_values[n].dtype == v.dtype, n
    client.delete(name)


@pytest.mark.parametrize("named", [True, False], ids=["param_names", "by-position"])
def test_torch_save_of_adamw_imports_bit_exactly(
    tmp_path: Path, client: Client, named: bool
) -> None:
    model, optimizer = saved_job(tmp_path, 3, named=named)
    name = unique("pt")
    s = client.import_checkpoint(
        tmp_path / "optim.pt", name, weights=tmp_path / "model.pt", progress=False
    )
    assert (s.step, s.optimizer) == (3, "adamw")
    got_state, got_values = remote_state(client, name)
    assert_state_equal(got_state, named_state(model, optimizer))
    for n, p in model.named_parameters():
        assert torch.equal(got_values[n], p.detach()), n
    for group, info in zip(optimizer.param_groups, s.groups, strict=True):
        assert (info.lr, tuple(info.betas), info.weight_decay, info.amsgrad) == (
            group["lr"],
            group["betas"],
            group["weight_decay"],
            group["amsgrad"],
        )
    client.delete(name)


def test_hf_trainer_checkpoint_imports_bit_exactly(hf_run: HFRun, client: Client) -> None:
    name = unique("hf")
    s = client.import_checkpoint(hf_run.out / "checkpoint-2", name, progress=False)
    source = hf_run.saved[2]
    assert (s.step, s.optimizer) == (2, "adamw")
    got_state, got_values = remote_state(client, name)
    assert assert_state_equal(got_state, source.state) == 20 * 3
    for n, v in source.values.items():
        assert torch.equal(got_values[n], v), n
    assert [g.params for g in s.groups] == [names for names, _ in source.groups]
    assert [g.lr for g in s.groups] == [opts["lr"] for _, opts in source.groups]
    # The Adam step of every parameter travelled with its state; the stepper's own step
    # count is the Trainer's global step.
    assert {p.step for p in s.params} == {2.0}
    client.delete(name)


# ---------------------------------------------------------------------- round trip


def _uninterrupted(steps: int) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    train(model, make_optimizer(model, named=True), range(1, steps + 1))
    return model


@pytest.mark.parametrize("export_format", ["torch", "dcp"])
def test_round_trip_is_bit_exact_with_an_uninterrupted_run(
    tmp_path: Path, client: Client, export_format: str
) -> None:
    """N local steps -> torch.save -> import (hosted) -> M steps with RemoteAdamW -> export
    -> load into a fresh local job -> K more steps == N+M+K uninterrupted local steps."""
    n, m, k = 3, 4, 3
    saved_job(tmp_path, n)
    name = unique("trip")
    client.import_checkpoint(
        tmp_path / "optim.pt", name, weights=tmp_path / "model.pt", progress=False
    )
    torch.manual_seed(1)  # other initial weights: only what the stepper holds may count
    replay = TinyNet()
    # The same groups as the job's (RemoteAdamW attaches: the stepper's values and options
    # replace these).
    groups = [
        {
            "params": list(zip(g["param_names"], g["params"], strict=True)),
            **{o: v for o, v in g.items() if o not in ("params", "param_names")},
        }
        for g in make_optimizer(replay, named=True).param_groups
    ]
    remote_opt = RemoteAdamW(groups, client=client, name=name)
    assert remote_opt.remote_step == n
    train(replay, remote_opt, range(n + 1, n + m + 1))
    assert client.get(name).step == n + m

    out = tmp_path / "export"
    client.export_checkpoint(name, out, format=export_format, progress=False)
    torch.manual_seed(2)
    resumed = TinyNet()
    optimizer = make_optimizer(resumed, named=True)
    if export_format == "torch":
        resumed.load_state_dict(load_file(str(out / "model.safetensors")))
        optimizer.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    else:
        msd, osd = get_state_dict(resumed, optimizer)
        state = {"model": msd, "optim": osd}
        with warnings.catch_warnings():  # "torch.distributed is disabled...": no_dist is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=out, no_dist=True)
        set_state_dict(
            resumed, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    train(resumed, optimizer, range(n + m + 1, n + m + k + 1))

    reference = _uninterrupted(n + m + k)
    for (a, p), (b, q) in zip(
        resumed.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert a == b and torch.equal(p, q), a
    client.delete(name)


# ---------------------------------------------------------------------- frozen, diff


def test_frozen_refuses_steps_allows_edits_and_unfreezes(tmp_path: Path, client: Client) -> None:
    model, optimizer = saved_job(tmp_path, 3)
    name = unique("frozen")
    s = client.import_checkpoint(
        tmp_path / "optim.pt",
        name,
        weights=tmp_path / "model.pt",
        step_into="frozen",
        progress=False,
    )
    assert s.kind == "frozen" and s.step == 3
    before = client.get_state(name, with_params=True)
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(StepperFrozenError, match="frozen"):
        client.step(name, grads)
    after = client.get_state(name, with_params=True)
    assert_state_equal(after, before)  # refused and byte-identical
    assert client.get(name).step == 3

    # Reads and statistics work on evidence; so does trying a fix.
    assert client.stats(name) is not None
    client.snapshot(name, "as-imported")
    v = after["layers.0.weight"]["exp_avg_sq"].clone()
    v[0].zero_()
    client.put_state(name, {"layers.0.weight": {"exp_avg_sq": v}})
    client.set_hyperparameters(name, group=0, lr=5e-3)
    assert torch.equal(client.get_state(name)["layers.0.weight"]["exp_avg_sq"], v)

    # Unfrozen, it steps on from the checkpoint's step, as the local optimizer would.
    assert client.set_kind(name, "hosted").kind == "hosted"
    for g in optimizer.param_groups[:1]:
        g["lr"] = 5e-3
    p = dict(model.named_parameters())["layers.0.weight"]
    optimizer.state[p]["exp_avg_sq"][0].zero_()
    for n, q in model.named_parameters():
        q.grad = grads[n].clone()
    optimizer.step()
    assert client.step(name, grads).step == 4
    got_state, got_values = remote_state(client, name)
    assert_state_equal(got_state, named_state(model, optimizer))
    for n, q in model.named_parameters():
        assert torch.equal(got_values[n], q.detach()), n
    client.delete(name)


def test_diff_between_two_imported_checkpoints_of_one_run(hf_run: HFRun, client: Client) -> None:
    a, b = unique("hf-2"), unique("hf-4")
    client.import_checkpoint(hf_run.out / "checkpoint-2", a, step_into="frozen", progress=False)
    client.import_checkpoint(hf_run.out / "checkpoint-4", b, step_into="frozen", progress=False)
    report = client.diff(a, b)
    name = "model.layers.0.mlp.up_proj.weight"
    entry = report["tensors"][name]["exp_avg_sq"]
    old = hf_run.saved[2].state[name]["exp_avg_sq"].double()
    new = hf_run.saved[4].state[name]["exp_avg_sq"].double()
    assert entry["changed"] and entry["changed_elements"] == int((old != new).sum())
    assert entry["max_abs_diff"] == float((new - old).abs().max())
    step = report["tensors"][name]["step"]
    assert (step["a"], step["b"]) == (2.0, 4.0)
    # The scheduler moved the learning rate between the two saves: the diff says so.
    lrs = {(o["group"], o["a"], o["b"]) for o in report["options"] if o["option"] == "lr"}
    assert lrs == {
        (gi, opts2["lr"], opts4["lr"])
        for gi, ((_, opts2), (_, opts4)) in enumerate(
            zip(hf_run.saved[2].groups, hf_run.saved[4].groups, strict=True)
        )
    }
    client.delete(a)
    client.delete(b)


# ---------------------------------------------------------------------- refusals


class _Payload:
    """A pickle that would create ``marker`` when loaded without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path)
    with pytest.raises(Exception):  # noqa: B017 - only that it refuses, before anything runs
        torch.load(path, weights_only=True)
    assert not marker.exists()
    return path, marker


def test_malicious_pt_is_refused_and_nothing_runs(tmp_path: Path, client: Client) -> None:
    path, marker = _malicious(tmp_path)
    name = unique("evil")
    with pytest.raises(UnsafeCheckpointError, match="nothing in it was executed"):
        client.import_checkpoint(path, name, progress=False)
    assert not marker.exists()
    with pytest.raises(StepperNotFoundError):
        client.get(name)
    # The payload is real: loaded without restrictions, it runs.
    with path.open("rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _cli(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> Ran:
    """The ``adamscope`` command line, run in this process (its own entry point, main)."""
    code = main([*args, "--url", url])
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def test_cli_refuses_a_malicious_pt(
    tmp_path: Path, live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = _malicious(tmp_path)
    done = _cli(capsys, live_server.url, "import-checkpoint", str(path), "--name", unique("evil"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused to load" in done.stderr and "nothing in it was executed" in done.stderr
    assert "weights_only=False" not in done.stderr  # torch's advice is not passed on
    assert not marker.exists()


def test_cli_imports_and_exports(
    tmp_path: Path, live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    model, optimizer = saved_job(tmp_path, 3, named=False)
    name = unique("cli")
    done = _cli(
        capsys,
        live_server.url,
        "import-checkpoint",
        str(tmp_path / "optim.pt"),
        "--name",
        name,
        "--weights",
        str(tmp_path / "model.pt"),
        "--step-into",
        "frozen",
    )
    assert done.returncode == 0, done.stderr
    assert f"imported as frozen stepper {name} at step 3" in done.stdout
    assert "inferred: names matched by position to" in done.stdout  # how names were found
    listing = _cli(capsys, live_server.url, "ls").stdout
    assert any(line.startswith(name) and "3 (frozen)" in line for line in listing.splitlines())
    assert "frozen: steps are refused" in _cli(capsys, live_server.url, "show", name).stdout
    out = tmp_path / "out"
    done = _cli(capsys, live_server.url, "export-checkpoint", name, str(out), "--format", "torch")
    assert done.returncode == 0, done.stderr
    back = read_checkpoint(out / "optimizer.pt", weights=out / "model.safetensors")
    assert back.global_step == 3
    assert_state_equal({p.name: p.state for p in back}, named_state(model, optimizer))
    with Client(live_server.url) as c:
        c.delete(name)


def test_async_client_imports_and_exports(tmp_path: Path, live_server: LiveServer) -> None:
    model, optimizer = saved_job(tmp_path, 2)
    name = unique("aio")

    async def go() -> Any:
        async with AsyncClient(live_server.url) as c:
            s = await c.import_checkpoint(
                tmp_path / "optim.pt", name, weights=tmp_path / "model.pt", progress=False
            )
            ckpt = await c.export_checkpoint(name, tmp_path / "dcp", format="dcp", progress=False)
            await c.delete(name)
            return s, ckpt

    s, ckpt = asyncio.run(go())
    assert s.step == 2 and ckpt.global_step == 2
    assert_state_equal(
        {p.name: p.state for p in read_checkpoint(tmp_path / "dcp")}, named_state(model, optimizer)
    )
