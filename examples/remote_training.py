"""Train a small MLP with its Adam state hosted by adamscope, inspect it, and check exactness.

Start the service in another terminal first::

    adamscope serve                                   # http://127.0.0.1:8470
    python examples/remote_training.py --steps 200    # or --url / $ADAMSCOPE_URL

What it does:

1. trains an MLP on synthetic regression data with ``RemoteAdam`` (named parameters, a
   cosine LR schedule): the gradients go to the service, which runs PyTorch's Adam step and
   sends the new parameters back;
2. inspects the stepper: its summary, the bias-correction factors at its current step, and
   statistics of one tensor's ``exp_avg_sq`` fetched with ``Client.get_state``;
3. replays the same training locally with ``torch.optim.Adam`` and checks that parameters
   and every state tensor are bit-identical (``torch.equal``) to the service's;
4. deletes the stepper unless ``--keep`` is given.

Exit status: 0 when the results are bit-identical, 1 when they are not, 2 when the run could
not start (service unreachable, stepper name already taken).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from adamscope import Client, RemoteAdam
from adamscope.client.errors import AdamscopeError, StepperNotFoundError

IN_FEATURES, HIDDEN, BATCH, SAMPLES = 16, 64, 64, 1024
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, 1),
    )


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth nonlinear target plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, 1, generator=g) / IN_FEATURES**0.5
    y = torch.sin(2 * x @ w) + 0.1 * (x[:, :1] ** 2) + 0.01 * torch.randn(SAMPLES, 1, generator=g)
    return x, y


def batches(
    x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same minibatch sequence every time it is called with the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        yield x[idx], y[idx]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    seed: int,
    print_every: int = 0,
) -> float:
    """Plain PyTorch training loop; identical for the remote and the local optimizer."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4)
    loss_fn = nn.MSELoss()
    loss = torch.tensor(float("nan"))
    for i, (xb, yb) in enumerate(batches(*data, steps, seed), start=1):
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        if print_every and (i % print_every == 0 or i == steps):
            print(f"  step {i:5d}  loss {loss.item():.6f}  lr {sched.get_last_lr()[0]:.6f}")
    return float(loss.item())


def inspect(client: Client, name: str, param: str) -> None:
    summary = client.get(name)
    print(
        f"\nStepper {summary.name!r}: {summary.optimizer} on {summary.device}, "
        f"step {summary.step}, {summary.numel:,} parameters, "
        f"{summary.state_bytes:,} bytes of parameters + state"
    )
    for group in summary.groups:
        # lr is the one the last step used: the scheduler's next change travels with the next step
        print(
            f"  group {group.index}: lr={group.lr:.6g} betas={group.betas} eps={group.eps:g} "
            f"weight_decay={group.weight_decay:g} params={group.params}"
        )
    for p in summary.params:
        print(f"  {p.name:10s} shape={p.shape} dtype={p.dtype} step={p.step} state={p.state}")

    report = client.bias_correction(name)
    bc = report.groups[0]
    print(
        f"\nBias correction at step {bc.step:g} (group 0): 1-beta1^t = {bc.bias_correction1:.6g}"
        f", 1-beta2^t = {bc.bias_correction2:.6g}, sqrt = {bc.bias_correction2_sqrt:.6g}, "
        f"step size lr/(1-beta1^t) = {bc.step_size:.6g}"
    )

    v = client.get_state(name, names=[param], keys=["exp_avg_sq"])[param]["exp_avg_sq"]
    v_hat = v / bc.bias_correction2
    effective = bc.step_size / (v_hat.sqrt() + HYPER["eps"])  # per-element step scale
    print(
        f"\nexp_avg_sq of {param!r} {list(v.shape)}: min {v.min().item():.3e}  "
        f"median {v.median().item():.3e}  max {v.max().item():.3e}  "
        f"zeros {(v == 0).sum().item()}"
    )
    print(
        f"  update per unit of exp_avg, lr/bc1/(sqrt(v/bc2)+eps): "
        f"median {effective.median().item():.3e}  max {effective.max().item():.3e}"
    )


def compare(
    client: Client,
    name: str,
    remote_model: nn.Module,
    local_model: nn.Module,
    local_opt: torch.optim.Optimizer,
) -> list[str]:
    """Differences between the service's params/state and the local run's (empty: identical)."""
    problems = []
    remote_params = client.get_params(name)
    remote_state = client.get_state(name)
    local = dict(local_model.named_parameters())
    for pname, p in remote_model.named_parameters():
        lp = local[pname]
        if not torch.equal(p.detach(), lp.detach()):
            problems.append(f"{pname}: training-side parameter differs")
        if not torch.equal(remote_params[pname], lp.detach()):
            problems.append(f"{pname}: service parameter differs")
        lstate = local_opt.state[lp]
        rstate = remote_state.get(pname, {})
        if set(rstate) != set(lstate):
            problems.append(f"{pname}: state keys {sorted(rstate)} != {sorted(lstate)}")
        for key in sorted(set(rstate) & set(lstate)):
            r, lt = rstate[key], lstate[key]
            if r.dtype != lt.dtype or not torch.equal(r, lt.to(r.device)):
                problems.append(f"{pname}.{key} differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("ADAMSCOPE_URL", "http://127.0.0.1:8470"),
        help="service URL (default $ADAMSCOPE_URL or http://127.0.0.1:8470)",
    )
    parser.add_argument("--name", default="example-mlp", help="stepper name")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument(
        "--print-every",
        type=int,
        default=0,
        help="print the loss every N steps (default: about 10 lines)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the stepper on the service (default: delete it at the end)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    print_every = args.print_every or max(1, args.steps // 10)

    client = Client(args.url)
    try:
        health = client.health()
    except AdamscopeError as e:
        print(
            f"cannot reach adamscope at {args.url} ({e}); start it with `adamscope serve`",
            file=sys.stderr,
        )
        return 2
    print(
        f"adamscope {health['version']} at {args.url} (torch {health['torch']}, "
        f"default device {health['default_device']})"
    )
    try:
        client.get(args.name)
    except StepperNotFoundError:
        pass
    else:
        print(
            f"a stepper named {args.name!r} already exists: pick another --name, or delete "
            f"it (Client().delete({args.name!r}))",
            file=sys.stderr,
        )
        return 2

    data = make_data(args.seed)
    model = make_model(args.seed)
    local_model = copy.deepcopy(model)  # same initial weights, for the local replay

    # The stepper lives on the CPU so the local replay below runs the same kernels.
    opt = RemoteAdam(model.named_parameters(), **HYPER, client=client, name=args.name, device="cpu")
    try:
        print(
            f"\nTraining {sum(p.numel() for p in model.parameters()):,} parameters for "
            f"{args.steps} steps with RemoteAdam (stepper {args.name!r}):"
        )
        final = train(model, opt, data, args.steps, args.seed, print_every)
        print(f"final training loss {final:.6f}")

        inspect(client, args.name, param="2.weight")

        print(f"\nReplaying locally with torch.optim.Adam ({args.steps} steps)...")
        local_opt = torch.optim.Adam(local_model.parameters(), **HYPER)
        local_final = train(local_model, local_opt, data, args.steps, args.seed)
        problems = compare(client, args.name, model, local_model, local_opt)
        if local_final != final:
            problems.append(f"final loss {final!r} != local {local_final!r}")
        if problems:
            print("NOT bit-identical to local torch.optim.Adam:\n  " + "\n  ".join(problems))
            return 1
        n = len(list(model.parameters()))
        print(
            f"VERIFIED: bit-identical to local torch.optim.Adam after {args.steps} steps "
            f"(parameters and exp_avg/exp_avg_sq/step of all {n} tensors, torch.equal)"
        )
        return 0
    finally:
        if args.keep:
            print(f"kept stepper {args.name!r} at {args.url}")
        else:
            client.delete(args.name)
            print(f"deleted stepper {args.name!r}")
        client.close()


if __name__ == "__main__":
    sys.exit(main())
