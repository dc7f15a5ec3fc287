"""Open a training job's checkpoints, compare them, try a fix, replay, and resume the job.

Start the service in another terminal first::

    adamscope serve                                # http://127.0.0.1:8470
    python examples/checkpoint_roundtrip.py        # or --url / $ADAMSCOPE_URL

What it does:

1. a local training job (AdamW, two param groups) saves its optimizer the usual way,
   ``torch.save(optimizer.state_dict())`` plus the model's weights, at steps 3 and 5;
2. imports both checkpoints as ``frozen`` steppers (evidence: steps refused, every read
   works), prints the largest ``exp_avg_sq`` of each parameter and diffs the two;
3. tries a fix on the later one: resets ``exp_avg_sq`` of one row, lowers the lr;
4. imports the step-3 checkpoint as ``hosted`` and replays steps 4 and 5 with
   ``RemoteAdamW``: the service's state then equals the step-5 checkpoint bit for bit;
5. exports that stepper (``optimizer.pt`` + ``model.safetensors``), loads it into a fresh
   local job, trains 3 more steps, and checks the result is bit-identical to an
   uninterrupted 8-step run;
6. deletes its steppers unless ``--keep`` is given.

Exit status: 0 when everything is bit-identical, 1 when not, 2 when the run could not
start (service unreachable, a name taken).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adamscope import Client, RemoteAdamW
from adamscope.client.errors import AdamscopeError, StepperFrozenError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(x))))


HYPER = {"lr": 3e-3, "betas": (0.9, 0.95)}


def groups_of(model: nn.Module) -> list[dict[str, Any]]:
    """Weights decay, biases do not: two groups, from named_parameters() (so the saved
    state_dict carries param_names)."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Step ``s`` always sees the same batch, so runs can be compared bit for bit."""
    for step in steps:
        tokens = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(tokens[:-1]), tokens[1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fresh(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def equal_models(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="service URL (default $ADAMSCOPE_URL, else 127.0.0.1:8470)")
    ap.add_argument("--prefix", default="ckpt-demo", help="stepper names start with this")
    ap.add_argument("--keep", action="store_true", help="keep the steppers")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adamscope-ckpt-"))
    at3, at5, replay = (f"{args.prefix}-{s}" for s in ("step3", "step5", "replay"))

    # 1. The training job and its checkpoints.
    model = fresh(0)
    optimizer = torch.optim.AdamW(groups_of(model), **HYPER)
    for step, stop in ((1, 3), (4, 5)):
        train(model, optimizer, range(step, stop + 1))
        (work / f"step{stop}").mkdir()
        torch.save(optimizer.state_dict(), work / f"step{stop}" / "optim.pt")
        torch.save(model.state_dict(), work / f"step{stop}" / "model.pt")

    try:
        with Client(args.url) as c:
            # 2. Open both as evidence.
            for name, step in ((at3, 3), (at5, 5)):
                c.import_checkpoint(
                    work / f"step{step}" / "optim.pt",
                    name,
                    step_into="frozen",
                    weights=work / f"step{step}" / "model.pt",
                )
            for pname, state in c.get_state(at5, keys=["exp_avg_sq"]).items():
                print(f"{pname:14s} max exp_avg_sq {state['exp_avg_sq'].max().item():.3e}")
            report = c.diff(at3, at5)
            print(
                f"changed from step 3 to 5: {len(report['changed'])} tensors; "
                f"hidden.weight exp_avg_sq max |diff| "
                f"{report['tensors']['hidden.weight']['exp_avg_sq']['max_abs_diff']:.3e}"
            )
            try:
                c.step(at5, {"hidden.bias": torch.zeros(16)})
            except StepperFrozenError:
                print(f"{at5} is frozen: the step was refused")

            # 3. Try a fix on the evidence: reset v of one row, lower the lr.
            v = c.get_state(at5, ["emb.weight"], ["exp_avg_sq"])["emb.weight"]["exp_avg_sq"]
            v[7].zero_()
            c.put_state(at5, {"emb.weight": {"exp_avg_sq": v}})
            c.set_hyperparameters(at5, lr=1e-3)
            print(f"{at5}: reset exp_avg_sq of emb.weight row 7, lr now 1e-3")

            # 4. Replay the steps after the step-3 checkpoint remotely.
            c.import_checkpoint(
                work / "step3" / "optim.pt",
                replay,
                step_into="hosted",
                weights=work / "step3" / "model.pt",
            )
            replayed = fresh(1)  # its values come from the stepper on attach
            remote = RemoteAdamW(groups_of(replayed), **HYPER, client=c, name=replay)
            train(replayed, remote, range(4, 6))
            want = torch.load(work / "step5" / "optim.pt", weights_only=True)
            got = c.state_dict(replay)
            same = all(
                torch.equal(got["state"][i][k], t)
                for i, s in want["state"].items()
                for k, t in s.items()
            )
            print(f"replayed steps 4-5 remotely: state equal to the step-5 checkpoint: {same}")

            # 5. Export, resume locally, compare with an uninterrupted run.
            c.export_checkpoint(replay, work / "export", format="torch")
            resumed = fresh(2)
            resumed.load_state_dict(load_file(str(work / "export" / "model.safetensors")))
            local = torch.optim.AdamW(groups_of(resumed), **HYPER)
            local.load_state_dict(torch.load(work / "export" / "optimizer.pt", weights_only=True))
            train(resumed, local, range(6, 9))
            reference = fresh(0)
            train(reference, torch.optim.AdamW(groups_of(reference), **HYPER), range(1, 9))
            ok = same and equal_models(resumed, reference)
            if not args.keep:
                for name in (at3, at5, replay):
                    c.delete(name)
    except AdamscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        "VERIFIED: import -> 2 remote steps -> export -> 3 local steps is bit-identical to "
        "8 uninterrupted local steps"
        if ok
        else "MISMATCH"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
