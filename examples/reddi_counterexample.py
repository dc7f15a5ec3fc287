"""Debug an unstable run: Adam on Reddi et al.'s counterexample, watched through adamscope.

Reddi, Kale and Kumar ("On the Convergence of Adam and Beyond", ICLR 2018) give a
one-dimensional online problem on which Adam moves the wrong way for ever: at step t the
loss is ``C * x`` when ``t % 3 == 1`` and ``-x`` otherwise, with x kept in [-1, 1]. The
average gradient, ``(C - 2) / 3``, is positive, so the best x is -1; but with
``beta1 = 0`` and ``beta2 = 1 / (1 + C**2)`` Adam's second moment forgets the rare large
gradient within two steps, the two small gradients get large effective learning rates,
and x drifts to +1. AMSGrad keeps the largest second moment and converges to -1.

This script runs both side by side on a live service (two steppers), then reads what the
service recorded: the alerts, the signals over one period, and the effective learning
rate. Start the service first (``adamscope serve``); ``--url`` or ``$ADAMSCOPE_URL`` point
elsewhere. The steppers are deleted at the end unless ``--keep`` is given (then the
dashboard and ``adamscope history`` show them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from adamscope import Client

C = 3.0
BETAS = (0.0, 1.0 / (1.0 + C**2))  # the counterexample's setting: beta2 = 0.1 for C = 3
LR = 0.5  # divided by sqrt(t) at step t, as in the paper


def gradient(t: int) -> float:
    return C if t % 3 == 1 else -1.0


def run(client: Client, name: str, amsgrad: bool, steps: int) -> float:
    """Online projected Adam: a step on the service, then x clipped back into [-1, 1]."""
    client.create(name, {"x": torch.zeros(1)}, lr=LR, betas=BETAS, eps=1e-8, amsgrad=amsgrad)
    x = torch.zeros(1)
    for t in range(1, steps + 1):
        reply = client.step(
            name,
            {"x": torch.tensor([gradient(t)])},
            return_params=True,
            param_groups=[{"lr": LR / math.sqrt(t)}],  # the schedule travels with the step
        )
        assert reply.params is not None
        x = reply.params["x"].clamp(-1.0, 1.0)
        if not torch.equal(x, reply.params["x"]):
            client.put_params(name, {"x": x})  # the projection of the online problem
    return float(x.item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("ADAMSCOPE_URL"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the two steppers")
    args = parser.parse_args(argv)

    with Client(args.url) as c:
        final = {name: run(c, name, name.endswith("amsgrad"), args.steps) for name in NAMES}
        print(f"after {args.steps} steps (the best x is -1):")
        for name, x in final.items():
            print(f"  {name:14s} x = {x:+.4f}")

        print("\nalerts raised (default rules):")
        for name in NAMES:
            report = c.alerts(name)
            rules = sorted({e.rule for e in report.events})
            print(f"  {name:14s} {report.count:3d} events  {rules}")

        print("\nthe last period of Adam's run (aggregate signals per step):")
        signals = ["lr_eff_p50", "shock_p99", "gamma_frac"]
        for name in NAMES:
            h = c.history(name, signal=signals, limit=3)
            assert not isinstance(h, str)
            print(f"  {name}:")
            print("    step  gradient  " + "  ".join(f"{s:>10s}" for s in signals))
            for i, step in enumerate(h.aggregate.steps):
                values = "  ".join(f"{h.aggregate.values[s][i]:10.4g}" for s in signals)
                print(f"    {step:4d}  {gradient(step):+8.0f}  {values}")

        print("\nthe update the next step would make, previewed by dry runs (nothing changes):")
        for name in NAMES:
            updates = [
                c.dry_run(name, {"x": torch.tensor([g])}, return_update=True).tensors["x"]["update"]
                for g in (C, -1.0)
            ]
            print(
                f"  {name:14s} gradient {C:+.0f}: {updates[0].item():+.5f}   "
                f"gradient -1: {updates[1].item():+.5f}"
            )

        if not args.keep:
            for name in NAMES:
                c.delete(name)
    return 0 if final["reddi-adam"] > 0 > final["reddi-amsgrad"] else 1


NAMES = ("reddi-adam", "reddi-amsgrad")

if __name__ == "__main__":
    sys.exit(main())
