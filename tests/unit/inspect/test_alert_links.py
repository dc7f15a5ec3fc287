"""An alert keeps the elements it is about: the top elements the localized signals
recorded at its step travel with the event (issue 14's alert links)."""

from __future__ import annotations

from test_signal_bars import JUMP, rare_rows

from adamscope.service.inspect.signals import signals_of


def test_the_alert_keeps_its_steps_top_elements_after_later_steps() -> None:
    obs, rare, at_jump, _ = rare_rows(False)
    [event] = list(obs.alerts.events)
    assert (event["step"], event["tensor"]) == (JUMP, "emb")
    # One step later the signals hold another step's (empty) tops; the event kept its own.
    assert signals_of(obs.stepper)["step"] == JUMP + 1
    assert event["top"] == at_jump["local"]["top"]["emb"]
    lr_change = event["top"]["lr_change"]
    assert len(lr_change["index"]) == 8
    assert {i // 16 for i in lr_change["index"]} <= set(rare)  # rows of the 4096x16 table
    # The step event carries the same alert, with its elements.
    [alert] = obs.alerts.at(event["seq"])
    assert alert["top"]["shock"] == at_jump["local"]["top"]["emb"]["shock"]
