"""An alert event names the elements it is about: ``GET .../alerts`` and the step event
return the top elements the localized signals recorded at the alert's step, long after it.
"""

from __future__ import annotations

import torch
from api_support import SPEC, V1, create, initial_values, step
from fastapi.testclient import TestClient

from adamscope.client.protocol import AlertsReport

NAME = SPEC["name"]
VALUES = initial_values()
RULE = {"kind": "above", "signal": "lr_fell_count", "tensor": "w", "threshold": 0}


def test_the_alerts_route_returns_the_alerts_top_elements(app_client: TestClient) -> None:
    c = app_client
    create(c, SPEC, VALUES)
    assert c.put(f"{V1}/{NAME}/alerts", json={"rules": [RULE]}).status_code == 200
    ones = {n: torch.ones_like(v) for n, v in VALUES.items()}
    assert step(c, NAME, ones).status_code == 200
    jump = {n: t.clone() for n, t in ones.items()}
    jump["w"][1, 2] = 1000.0  # v of w[1, 2] jumps: its effective LR falls ~1000-fold
    assert step(c, NAME, jump).status_code == 200
    for _ in range(3):  # later steps record no top elements of their own
        assert step(c, NAME, ones).status_code == 200
    report = AlertsReport.model_validate(c.get(f"{V1}/{NAME}/alerts").json())
    [event] = report.events
    assert (event.step, event.tensor, event.signal) == (2, "w", "lr_fell_count")
    assert event.top is not None
    change = event.top["lr_change"]
    assert change.index[0] == 1 * 3 + 2  # row 1, column 2 of the 2x3 tensor
    assert change.value[0] < 0.01  # the ratio new/old of its effective LR
    assert event.top["shock"].index[0] == 5
