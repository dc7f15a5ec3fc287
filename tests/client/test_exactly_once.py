"""Exactly-once stepping: idempotency keys, retries of lost replies, stale views, and the
accumulate mode for data-parallel workers, against a real server."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch
from conftest import spawn_server

from adamscope.client import Client, RemoteAdam
from adamscope.client.errors import ServerError, StepConflictError, TransportError
from adamscope.client.transport import WireTransport


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class DropReplies(httpx.BaseTransport):
    """Fault injection at the transport: the request reaches the real server (which
    applies it), then the reply is thrown away as if the connection died, ``drops`` times
    for requests whose path ends with ``suffix``."""

    def __init__(self, drops: int, suffix: str = "/step", status: int | None = None) -> None:
        self.inner = WireTransport()
        self.drops = drops
        self.suffix = suffix
        self.status = status
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith(self.suffix) or self.drops == 0:
            return self.inner.handle_request(request)
        self.sent += 1
        self.drops -= 1
        if self.status is not None:  # answered by a failing proxy, never reaches the server
            return httpx.Response(
                self.status,
                json={"code": "internal_error", "status": self.status, "detail": "injected"},
            )
        response = self.inner.handle_request(request)
        response.read()
        response.close()
        raise httpx.ReadError("reply lost (injected)")

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def faulty_client(url: str, transport: httpx.BaseTransport, retries: int = 3) -> Iterator[Client]:
    with httpx.Client(base_url=url, transport=transport, timeout=30) as http:
        yield Client(url, http_client=http, retries=retries, backoff=0.01)


def make(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]


def test_lost_replies_are_retried_and_the_step_applies_once(live_server):
    name = unique("lost")
    transport = DropReplies(drops=2)
    init = make()
    with faulty_client(live_server.url, transport) as c, Client(live_server.url) as direct:
        c.create(name, {"w": init[0], "b": init[1]}, lr=0.1)
        grads = {"w": torch.ones(4, 3), "b": torch.ones(3)}
        reply = c.step(name, grads, return_params=True)
        assert transport.sent == 2  # two attempts reached the server and lost their reply
        assert reply.step == 1 and reply.replayed
        local = [t.clone().requires_grad_() for t in init]
        opt = torch.optim.Adam(local, lr=0.1)
        for p, g in zip(local, grads.values(), strict=True):
            p.grad = g
        opt.step()
        assert direct.get(name).step == 1
        server = direct.get_params(name)
        assert torch.equal(server["w"], local[0].detach())
        assert torch.equal(reply.params["w"], local[0].detach())
        state = direct.get_state(name)
        assert state["w"]["step"].item() == 1.0


def test_duplicate_key_returns_the_original_result(live_server):
    name = unique("dup")
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(3)}, lr=0.1)
        first = c.step(name, {"w": torch.ones(3)}, key="k-1")
        before = c.get_params(name)["w"]
        again = c.step(name, {"w": torch.full((3,), 7.0)}, key="k-1")
        assert (first.step, first.replayed) == (1, False)
        assert (again.step, again.replayed, again.stepped) == (1, True, ["w"])
        assert torch.equal(c.get_params(name)["w"], before)
        assert c.get(name).step == 1
        third = c.step(name, {"w": torch.ones(3)}, key="k-2")
        assert third.step == 2 and not third.replayed


def test_replayed_key_with_params_after_the_stepper_moved_on_is_a_conflict(live_server):
    name = unique("moved")
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(3)}, lr=0.1)
        c.step(name, {"w": torch.ones(3)}, key="a")
        c.step(name, {"w": torch.ones(3)}, key="b")
        with pytest.raises(StepConflictError) as err:
            c.step(name, {"w": torch.ones(3)}, key="a", return_params=True)
        assert err.value.current_step == 2
        assert c.step(name, {"w": torch.ones(3)}, key="a").replayed  # JSON replay is fine


def test_keys_survive_a_restart(tmp_path):
    """The keys are persisted with the state (every_step): a retry that reaches a restarted
    server is still recognised."""
    name = unique("restart")
    with spawn_server(tmp_path) as url, Client(url) as c:
        c.create(name, {"w": torch.zeros(3)}, lr=0.1)
        c.step(name, {"w": torch.ones(3)}, key="before-restart")
        params = c.get_params(name)["w"]
    with spawn_server(tmp_path) as url, Client(url) as c:
        again = c.step(name, {"w": torch.ones(3)}, key="before-restart")
        assert again.replayed and again.step == 1
        assert torch.equal(c.get_params(name)["w"], params)


def test_stale_expected_step_is_rejected_with_the_current_step(live_server):
    name = unique("stale")
    with Client(live_server.url) as c:
        c.create(name, {"w": torch.zeros(3)}, lr=0.1)
        c.step(name, {"w": torch.ones(3)}, expected_step=0)
        before = c.get_state(name)
        with pytest.raises(StepConflictError) as err:
            c.step(name, {"w": torch.ones(3)}, expected_step=0)
        assert err.value.status == 409 and err.value.current_step == 1
        after = c.get_state(name)
        assert all(torch.equal(before["w"][k], after["w"][k]) for k in before["w"])


def test_remote_adam_detects_a_second_writer(live_server):
    name = unique("writers")
    with Client(live_server.url) as c:
        p = torch.zeros(3, requires_grad=True)
        opt = RemoteAdam([p], lr=0.1, client=c, name=name)
        p.grad = torch.ones(3)
        opt.step()
        c.step(name, {"0": torch.ones(3)})  # someone else steps the same stepper
        with pytest.raises(StepConflictError):
            opt.step()
        opt.resync()
        assert torch.equal(p.detach(), c.get_params(name)["0"])
        opt.step()
        assert c.get(name).step == 3


def test_remote_adam_training_with_lost_replies_equals_local(live_server):
    name = unique("train")
    transport = DropReplies(drops=3)
    init = make(1)
    remote_p = [t.clone().requires_grad_() for t in init]
    local_p = [t.clone().requires_grad_() for t in init]
    with faulty_client(live_server.url, transport) as c:
        opt = RemoteAdam(remote_p, lr=0.05, amsgrad=True, client=c, name=name)
        ref = torch.optim.Adam(local_p, lr=0.05, amsgrad=True)
        gen = torch.Generator().manual_seed(5)
        for _ in range(6):
            grads = [torch.randn(t.shape, generator=gen) for t in init]
            for p, q, g in zip(remote_p, local_p, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        assert transport.sent == 3
        for a, b in zip(remote_p, local_p, strict=True):
            assert torch.equal(a.detach(), b.detach())
        assert c.get(name).step == 6
        opt.close()


def test_5xx_is_retried_and_non_idempotent_calls_are_not_resent(live_server):
    name = unique("fivexx")
    with faulty_client(live_server.url, DropReplies(drops=1, status=503)) as c:
        c.create(name, {"w": torch.zeros(3)})
        assert c.step(name, {"w": torch.ones(3)}).step == 1
    # A create whose reply was lost is not resent (it has no key): the error surfaces.
    lost_create = DropReplies(drops=1, suffix="/v1/steppers")
    with faulty_client(live_server.url, lost_create) as c, pytest.raises(TransportError):
        c.create(unique("once"), {"w": torch.zeros(3)})
    assert lost_create.sent == 1
    # With retries exhausted the last error is raised.
    with (
        faulty_client(live_server.url, DropReplies(drops=5, status=500), retries=2) as c,
        pytest.raises(ServerError),
    ):
        c.step(name, {"w": torch.ones(3)})


# --------------------------------------------------------------------- accumulate mode


def mean_step(
    init: list[torch.Tensor], contributions: list[list[torch.Tensor]], lr: float
) -> list[torch.Tensor]:
    """The documented reference: (((g_0 + g_1) + g_2) + ...) / n, then one Adam step."""
    params = [t.clone().requires_grad_() for t in init]
    opt = torch.optim.Adam(params, lr=lr)
    for i, p in enumerate(params):
        acc = contributions[0][i].clone()
        for c in contributions[1:]:
            acc.add_(c[i])
        p.grad = acc.div_(len(contributions))
    opt.step()
    return [p.detach() for p in params]


def test_accumulate_mode_applies_the_mean_once_all_workers_contributed(live_server):
    name = unique("accum")
    init = make(2)
    gen = torch.Generator().manual_seed(9)
    contribs = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]
    with Client(live_server.url) as c:
        c.create(name, {"w": init[0], "b": init[1]}, lr=0.1)
        # Workers arrive out of order; a retried contribution counts once.
        r2 = c.contribute(
            name, {"w": contribs[2][0], "b": contribs[2][1]}, worker=2, contributors=3, key="w2"
        )
        again = c.contribute(
            name, {"w": contribs[2][0], "b": contribs[2][1]}, worker=2, contributors=3, key="w2"
        )
        r0 = c.contribute(
            name, {"w": contribs[0][0], "b": contribs[0][1]}, worker=0, contributors=3, key="w0"
        )
        assert (r2.applied, again.applied, r0.applied) == (False, False, False)
        assert r0.pending == [0, 2] and c.get(name).step == 0
        with pytest.raises(StepConflictError):  # worker 0 again, with a different key
            c.contribute(name, {"w": contribs[0][0]}, worker=0, contributors=3, key="other")
        with pytest.raises(StepConflictError):  # a different group size
            c.contribute(name, {"w": contribs[1][0]}, worker=1, contributors=4, key="x")
        r1 = c.contribute(
            name,
            {"w": contribs[1][0], "b": contribs[1][1]},
            worker=1,
            contributors=3,
            key="w1",
            return_params=True,
        )
        assert r1.applied and r1.step == 1
        expected = mean_step(init, contribs, 0.1)
        assert torch.equal(r1.params["w"], expected[0])
        assert torch.equal(r1.params["b"], expected[1])
        # Every contribution's key now answers with the applied step.
        assert (
            c.contribute(name, {"w": contribs[0][0]}, worker=0, contributors=3, key="w0").step == 1
        )
        assert c.get(name).step == 1


def test_accumulate_workers_waiting_together_all_get_the_new_parameters(live_server):
    name = unique("wait")
    init = make(3)
    gen = torch.Generator().manual_seed(4)
    contribs = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(4)]
    replies: dict[int, object] = {}
    with Client(live_server.url) as setup:
        setup.create(name, {"w": init[0], "b": init[1]}, lr=0.1)

    def worker(i: int) -> None:
        with Client(live_server.url) as c:
            replies[i] = c.contribute(
                name,
                {"w": contribs[i][0], "b": contribs[i][1]},
                worker=i,
                contributors=4,
                wait=20,
                return_params=True,
            )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    expected = mean_step(init, contribs, 0.1)
    for i in range(4):
        reply = replies[i]
        assert reply.applied and reply.step == 1, (i, reply)
        assert torch.equal(reply.params["w"], expected[0])
        assert torch.equal(reply.params["b"], expected[1])


def test_commit_applies_the_contributions_so_far(live_server):
    name = unique("commit")
    init = make(4)
    with Client(live_server.url) as c:
        c.create(name, {"w": init[0], "b": init[1]}, lr=0.1)
        with pytest.raises(StepConflictError):
            c.commit(name)  # nothing pending
        g0 = [torch.ones(4, 3), torch.ones(3)]
        g1 = [torch.full((4, 3), 3.0), None]
        c.contribute(name, {"w": g0[0], "b": g0[1]}, worker=0, contributors=8)
        c.contribute(name, {"w": g1[0]}, worker=1, contributors=8)
        reply = c.commit(name)
        assert reply.step == 1 and reply.stepped == ["w", "b"]
        params = [t.clone().requires_grad_() for t in init]
        opt = torch.optim.Adam(params, lr=0.1)
        params[0].grad = (g0[0].clone().add_(g1[0])).div_(2)  # w: two contributions
        params[1].grad = g0[1].clone().div_(1)  # b: only worker 0 sent one
        opt.step()
        server = c.get_params(name)
        assert torch.equal(server["w"], params[0].detach())
        assert torch.equal(server["b"], params[1].detach())
