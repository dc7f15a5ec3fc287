"""Watch a training job's own optimizer: a local fused AdamW, reported to adamscope.

    adamscope serve &                                   # the service, on 127.0.0.1:8470
    python examples/watch_training.py --steps 200       # trains here; watch it in the dashboard

The model trains locally, exactly as it would without adamscope: ``adamscope.watch`` hooks
the optimizer, computes the per-step signals on the trainer's side and sends them from a
background thread. While it runs, this script also shows the two-way part: it reads the
optimizer's state through the service (answered by the trainer at a step boundary, bit for
bit what ``opt.state`` held then) and halves the learning rate with a command the trainer
applies between two steps. Prints ``VERIFIED`` lines when each checks out.
"""

from __future__ import annotations

import argparse
import os
import threading

import httpx
import torch

import adamscope
from adamscope.client import codec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="the service (default: $ADAMSCOPE_URL)")
    ap.add_argument("--name", default="example-watched")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(256, 16), torch.randn(256, 1)
    run = adamscope.watch(opt, model=model, url=args.url, name=args.name)
    url = (args.url or os.environ.get("ADAMSCOPE_URL") or "http://127.0.0.1:8470").rstrip("/")
    seen: dict[int, dict[str, torch.Tensor]] = {}
    answer: dict[str, httpx.Response] = {}

    def read_state() -> None:  # another process could do this: a person at the dashboard
        answer["r"] = httpx.get(f"{url}/v1/watch/{args.name}/state?name=2.weight", timeout=60)

    reader = threading.Thread(target=read_state)
    with run:
        for step in range(1, args.steps + 1):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            run.log(loss=loss)
            seen[run.step] = {k: v.clone() for k, v in opt.state[model[2].weight].items()}
            if step == 10:
                reader.start()
            if step == 20:
                command = httpx.post(
                    f"{url}/v1/watch/{args.name}/commands",
                    json={"op": "options", "options": {"lr": 5e-4}},
                ).json()
        reader.join()
        run.flush()
    r = answer["r"]
    at = int(r.headers["x-adamscope-step"])
    got = codec.decode(r.content)[0]
    same = all(torch.equal(got[f"2.weight/{k}"], v) for k, v in seen[at].items())
    print(f"state of '2.weight' read through the service at step {at}: bit-identical={same}")
    applied = httpx.get(f"{url}/v1/watch/{args.name}/commands/{command['id']}").json()
    print(
        f"lr command: {applied['status']} at step {applied['step']};"
        f" lr now {opt.param_groups[0]['lr']}"
    )
    summary = httpx.get(f"{url}/v1/steppers/{args.name}").json()
    print(f"the service shows {args.name!r}: kind {summary['kind']}, step {summary['step']}")
    print(f"reports sent {run.sent}, dropped {run.dropped}")
    if same and applied["status"] == "applied" and opt.param_groups[0]["lr"] == 5e-4:
        print("VERIFIED: state read bit-exact, lr change applied once between two steps")
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
