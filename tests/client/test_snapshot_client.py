"""Client and AsyncClient durability methods against real servers: snapshot, snapshots,
restore, download_snapshot, import_snapshot (to a second server), delete_snapshot,
checkpoint, set_durability; and the progress bar large transfers show."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LiveServer, run_uvicorn
from remote_support import unique

from adamscope.client import AsyncClient, Client
from adamscope.client.errors import (
    InvalidCheckpointError,
    RequestValidationError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StepperExistsError,
)
from adamscope.client.progress import Progress
from adamscope.service.settings import Settings

KINDS = ["sync", "async"]


@contextlib.asynccontextmanager
async def open_client(kind: str, url: str) -> AsyncIterator[Client | AsyncClient]:
    if kind == "sync":
        with Client(url) as c:
            yield c
    else:
        async with AsyncClient(url) as ac:
            yield ac


async def call(client: Client | AsyncClient, method: str, *args: Any, **kwargs: Any) -> Any:
    result = getattr(client, method)(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A second service with its own data directory (the "other machine")."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("elsewhere"), device="cpu")
    with run_uvicorn(settings) as server:
        yield server


def initial() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen)}


def grads(k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + k)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen)}


async def everything(c: Client | AsyncClient, name: str) -> tuple[Any, ...]:
    summary = await call(c, "get", name)
    return (
        await call(c, "get_params", name),
        await call(c, "get_state", name),
        summary.model_dump(
            exclude={
                "name",
                "created_at",
                "updated_at",
                "persisted_at",
                "persisted_step",
                "dirty",
                "durability",
            }
        ),
    )


def assert_same(a: Any, b: Any) -> None:
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_round_trip_through_a_file_to_another_server(
    kind: str,
    live_server: LiveServer,
    elsewhere: LiveServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = unique(f"snap-{kind}")

    async def scenario() -> None:
        async with (
            open_client(kind, live_server.url) as c,
            open_client(kind, elsewhere.url) as other,
        ):
            created = await call(
                c, "create", name, initial(), lr=0.01, durability={"mode": "every_n", "n": 10}
            )
            assert created.durability is not None and created.durability.n == 10
            for k in range(2):
                await call(c, "step", name, grads(k))
            info = await call(c, "snapshot", name, "two")
            assert (info.name, info.step, info.stepper) == ("two", 2, name)
            at_two = await everything(c, name)
            with pytest.raises(SnapshotExistsError):
                await call(c, "snapshot", name, "two")
            auto = await call(c, "snapshot", name)
            assert auto.name.startswith("step2-")
            listed = await call(c, "snapshots", name)
            assert [s.name for s in listed] == ["two", auto.name]

            await call(c, "step", name, grads(2))
            summary = await call(c, "restore", name, "two")
            assert summary.step == 2
            assert_same(await everything(c, name), at_two)
            with pytest.raises(SnapshotNotFoundError):
                await call(c, "restore", name, "nope")

            path = await call(
                c, "download_snapshot", name, "two", tmp_path / "two.st", progress=True
            )
            assert path == tmp_path / "two.st" and path.stat().st_size == info.size
            assert not (tmp_path / "two.st.part").exists()
            with pytest.raises(SnapshotNotFoundError):
                await call(c, "download_snapshot", name, "nope", tmp_path / "x.st")
            assert not (tmp_path / "x.st").exists() and not (tmp_path / "x.st.part").exists()

            imported = await call(other, "import_snapshot", path, progress=True)
            assert imported.name == name and imported.step == 2
            assert imported.durability is not None and imported.durability.mode == "every_n"
            assert_same(await everything(other, name), at_two)
            with pytest.raises(StepperExistsError):
                await call(other, "import_snapshot", path, progress=False)
            renamed = await call(other, "import_snapshot", path, f"{name}-b", progress=False)
            assert renamed.name == f"{name}-b"
            bogus = tmp_path / "bogus.st"
            bogus.write_bytes(b"\x00" * 32)
            with pytest.raises(InvalidCheckpointError):
                await call(other, "import_snapshot", bogus)

            # Both continue identically from the same state.
            await call(c, "step", name, grads(2))
            await call(other, "step", name, grads(2))
            assert_same(await everything(c, name), await everything(other, name))

            await call(c, "delete_snapshot", name, "two")
            assert [s.name for s in await call(c, "snapshots", name)] == [auto.name]
            with pytest.raises(SnapshotNotFoundError):
                await call(c, "delete_snapshot", name, "two")

            written = await call(c, "checkpoint", name)
            assert written.step == 3 and written.size > 0
            changed = await call(c, "set_durability", name, "interval", seconds=5)
            assert changed.durability.mode == "interval" and changed.durability.seconds == 5
            with pytest.raises(RequestValidationError):
                await call(c, "set_durability", name, "every_n")
            for target in (c, other):
                await call(target, "delete", name)
            await call(other, "delete", f"{name}-b")

    asyncio.run(scenario())
    err = capsys.readouterr().err
    assert f"{name}/two [" in err and "100.0%" in err  # download bar, forced on
    assert "upload two.st [" in err


def test_progress_bar_draws_only_when_asked_or_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet, tty, forced = io.StringIO(), Tty(), io.StringIO()
    for stream, enabled in ((quiet, None), (tty, None), (forced, True)):
        with Progress(3 * 2**20, "file", enabled, stream=stream) as bar:
            for _ in range(3):
                bar.update(2**20)
    assert quiet.getvalue() == ""
    for stream in (tty, forced):
        out = stream.getvalue()
        assert out.startswith("\rfile [") and out.endswith("\n")
        assert "100.0% 3.0 MiB/3.0 MiB" in out
    with Progress(None, "stream", True, stream=(unknown := io.StringIO())) as bar:
        bar.update(1500)
    assert "stream 1.5 KiB" in unknown.getvalue()
