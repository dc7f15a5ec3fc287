"""How imports and exports travel (issue 16): in chunks with a progress bar, cleaning up
after a failed import, never touching a stepper that already had the name, and refusing an
export of a stepper that changed while it was read. Real server, real clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_local_job import TinyNet, make_optimizer, named_state, train
from checkpoint_support import assert_state_equal
from conftest import LiveServer
from remote_support import unique

from adamscope.client import Client
from adamscope.client import _checkpoint_transfer as transfer
from adamscope.client.checkpoints import CheckpointError, read_checkpoint
from adamscope.client.errors import InvalidStateError, StepperExistsError


@pytest.fixture
def client(live_server: LiveServer) -> Any:
    with Client(live_server.url) as c:
        yield c


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = make_optimizer(model, named=True)
    train(model, optimizer, range(1, 4))
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return tmp_path, model, optimizer


def test_small_chunks_carry_everything_and_the_bar_reaches_the_end(
    job: tuple[Path, TinyNet, torch.optim.Optimizer],
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, model, optimizer = job
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 600)  # every tensor its own request or two
    sent: list[str] = []
    original = client._send

    def counting(call: Any) -> Any:
        sent.append(f"{call.method} {call.path.rsplit('/', 1)[-1]}")
        return original(call)

    monkeypatch.setattr(client, "_send", counting)
    name = unique("chunks")
    client.import_checkpoint(path / "optim.pt", name, weights=path / "model.pt", progress=True)
    assert sent.count("PUT params") > 1 and sent.count("PUT state") > 1
    bar = capsys.readouterr().err
    assert f"import {name} [" in bar and "100.0%" in bar.splitlines()[-1]
    got = client.get_state(name)
    assert_state_equal({n: s for n, s in got.items() if s}, named_state(model, optimizer))
    sent.clear()
    back = client.export_checkpoint(name, progress=False)
    assert sent.count("GET state") > 1
    assert_state_equal({p.name: p.state for p in back}, named_state(model, optimizer))
    for n, p in model.named_parameters():
        assert torch.equal(back.params[n].value, p.detach()), n
    client.delete(name)


def test_a_failed_import_leaves_nothing_behind(
    job: tuple[Path, TinyNet, torch.optim.Optimizer], client: Client
) -> None:
    path, *_ = job
    ckpt = read_checkpoint(path / "optim.pt", weights=path / "model.pt")
    # An edit gone wrong: an amsgrad parameter without its max_exp_avg_sq. The service
    # refuses that state after the stepper and its values were created; the import undoes
    # them.
    del ckpt.params["layers.0.bias"].state["max_exp_avg_sq"]
    name = unique("failed")
    with pytest.raises(InvalidStateError, match="max_exp_avg_sq"):
        client.import_checkpoint(ckpt, name, progress=False)
    assert name not in [s.name for s in client.list()]


def test_an_import_never_touches_a_stepper_that_has_the_name(
    job: tuple[Path, TinyNet, torch.optim.Optimizer], client: Client
) -> None:
    path, *_ = job
    name = unique("taken")
    client.create(name, {"w": torch.ones(3)}, lr=0.1)
    client.step(name, {"w": torch.ones(3)})
    before = client.get_state(name, with_params=True)
    with pytest.raises(StepperExistsError):
        client.import_checkpoint(path / "optim.pt", name, weights=path / "model.pt", progress=False)
    assert_state_equal(client.get_state(name, with_params=True), before)
    client.delete(name)


def test_an_export_of_a_stepper_that_changes_meanwhile_is_refused(
    job: tuple[Path, TinyNet, torch.optim.Optimizer], client: Client
) -> None:
    path, model, _ = job
    name = unique("moving")
    client.import_checkpoint(path / "optim.pt", name, weights=path / "model.pt", progress=False)
    flow = transfer.export_flow(name, False)
    result = client._send(next(flow))  # the summary
    call = flow.send(result)  # the first chunk of values and state
    part = client._send(call)
    client.step(name, {n: torch.ones_like(p) for n, p in model.named_parameters()})
    with pytest.raises(CheckpointError, match="changed while it was exported"):
        call = flow.send(part)
        while True:
            call = flow.send(client._send(call))
    client.delete(name)
