"""The distributed service deployed the Ray way: a Serve config file run by ``serve run``.

The example config (examples/ray-serve.yaml) must be a valid Ray Serve config whose import
path is adamscope's application builder and whose args adamscope accepts. Run for real
(Ray Serve's own ``serve run`` CLI on a new local Ray, the proxy on 127.0.0.1 and an
ephemeral port): a remote training run there is bit-identical to local Adam, and stopping
``serve run`` (Ctrl-C) stops the slots gracefully, so a stepper whose policy had not
written it yet is on disk at its last step.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from adamscope.client import Client, RemoteAdamW
from adamscope.service.distributed import serve_config
from adamscope.service.distributed.serve_config import ServeArgs, cluster_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ray-serve.yaml"


def example() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


# Ray Serve's own config schema still uses pydantic-1-style field options.
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
def test_the_example_is_a_serve_config_of_this_builder() -> None:
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(example())
    [application] = config.applications
    assert import_attr(application.import_path) is serve_config.app
    args = ServeArgs.model_validate(application.args)
    assert args.slots == 2 and args.slot_bind == "auto"
    assert args.settings["data_dir"] == "/shared/adamscope-data"


def test_args_are_checked_and_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service settings.*data_dri"):
        serve_config.app({"settings": {"data_dri": str(tmp_path)}})
    with pytest.raises(ValueError, match="invalid adamscope args.*slot_count"):
        serve_config.app({"slot_count": 2})
    with pytest.raises(ValueError, match="invalid adamscope args.*slots"):
        serve_config.app({"slots": -1})
    with pytest.raises(ValueError, match="invalid service settings.*port"):
        serve_config.app({"settings": {"port": 70000}})
    # Slots listening off loopback need tokens, as the service itself does.
    with pytest.raises(ValueError, match="slot services"):
        serve_config.app({"slot_bind": "0.0.0.0", "settings": {"data_dir": str(tmp_path)}})
    tokens = [{"token": "t" * 32, "scope": "admin"}]
    config = cluster_config(
        ServeArgs(slot_bind="0.0.0.0", slots=3, settings={"data_dir": "d", "tokens": tokens})
    )
    assert config.slots == 3 and config.bind == "0.0.0.0"
    assert config.settings["data_dir"] == str(Path("d").resolve())  # absolute for every node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve run exited before the service was ready"
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200 and r.json().get("slots"):
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the service at {url} was not ready in {timeout} s")


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_serve_run_of_the_config_trains_exactly_and_stops_the_slots_gracefully(
    tmp_path: Path,
) -> None:
    port, data = _free_port(), tmp_path / "data"
    config = example()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    args.update(slots=1, slot_bind="127.0.0.1")
    # every_n:1000: nothing is written by the steps below, only by the graceful stop
    args["settings"] = {"data_dir": str(data), "durability": {"mode": "every_n", "n": 1000}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray Serve's `serve` command, run by this interpreter (Ray's workers start with it).
    serve = "import sys; from ray.serve.scripts import cli; sys.exit(cli())"
    proc = subprocess.Popen(
        [sys.executable, "-c", serve, "run", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout=240)
        g = torch.Generator().manual_seed(5)
        init = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
        local = {k: v.clone().requires_grad_() for k, v in init.items()}
        remote = {k: v.clone().requires_grad_() for k, v in init.items()}
        ref = torch.optim.AdamW(list(local.values()), lr=1e-2, weight_decay=0.1)
        with Client(url, timeout=120) as c:
            opt = RemoteAdamW(
                list(remote.items()), lr=1e-2, weight_decay=0.1, client=c, name="from-config"
            )
            for _ in range(5):
                grads = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
                for k in init:
                    local[k].grad, remote[k].grad = grads[k].clone(), grads[k].clone()
                ref.step()
                opt.step()
            assert all(torch.equal(local[k], remote[k]) for k in init)
            summary = c.get("from-config")
            assert summary.step == 5 and summary.dirty  # not on disk yet
    finally:
        proc.send_signal(signal.SIGINT)  # serve run's Ctrl-C: serve.shutdown()
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    [checkpoint] = data.rglob("from-config/checkpoint.safetensors")
    saved = load_file(str(checkpoint))
    assert all(torch.equal(saved[f"param/{k}"], local[k].detach()) for k in init)
    assert saved["state/w/step"].item() == 5
