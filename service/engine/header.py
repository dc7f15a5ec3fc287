"""A checkpoint's header: its fields checked on the way in, and a bound on its size.

Every checkpoint the service writes stays readable by it and by the reference
``safetensors`` library (whose header ceiling is :data:`adamscope.client.codec.MAX_HEADER_BYTES`):
:func:`check_header_room` refuses, at creation, a stepper whose names would make the header
of its checkpoint (with every state tensor and a full journal) larger than that.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from adamscope.client import codec
from adamscope.client.constants import META_CHECKPOINT, STEPPER_NAME_PATTERN

from .errors import InvalidCheckpoint, InvalidSpec
from .journal import DIGEST_BYTES, JOURNAL_KEYS, SETS_BUDGET
from .options import OPTIMIZERS, OPTION_NAMES

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PARAM_PREFIX",
    "RESERVED",
    "STATE_PREFIX",
    "check",
    "check_header_room",
    "header_bound",
    "parse_header",
]

FORMAT = "adamscope-checkpoint"
FORMAT_VERSION = 1
PARAM_PREFIX = "param/"
STATE_PREFIX = "state/"
#: Header keys the engine writes; annotations may not replace them.
RESERVED = frozenset(
    {
        "format",
        "version",
        "stepper",
        "optimizer",
        "device",
        "params",
        "groups",
        "step",
        "created_at",
        "updated_at",
        "saved_at",
        "torch",
        "extra",
        "idempotency",
    }
)
_NAME = re.compile(STEPPER_NAME_PATTERN)
_PARAM_NAME = re.compile(r"[^\x00-\x1f]{1,512}")  # as ParamSpec allows


#: Header bytes set aside for what is not per parameter: each group's options, the alert
#: rules and annotations in ``extra``, timestamps and the like.
HEADER_ALLOWANCE = 256 * 1024
#: Longest header entry of one tensor beyond its name and shape: the JSON punctuation, the
#: longest dtype tag and two 20-digit offsets.
_ENTRY_BYTES = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 2 * 20
_STATE_SUFFIXES = ("/step", "/exp_avg", "/exp_avg_sq", "/max_exp_avg_sq")


def header_bound(params: Sequence[tuple[str, Sequence[int]]], groups: int) -> int:
    """An upper bound on the header size of a checkpoint of a stepper with these parameter
    names and shapes: every state tensor present and the idempotency journal full."""
    entries = 0
    names = 0
    for name, shape in params:
        quoted = len(json.dumps(name))
        dims = sum(len(str(d)) + 1 for d in shape)
        entries += quoted + len(PARAM_PREFIX) + dims + _ENTRY_BYTES
        entries += sum(
            quoted + len(STATE_PREFIX) + len(k) + dims + _ENTRY_BYTES for k in _STATE_SUFFIXES
        )
        names += 2 * (quoted + 1)  # in "params" and in its group's "params"
    per_key = 4 * DIGEST_BYTES // 3 + 1 + 21 + 6  # a digest, a step and a set reference
    journal = JOURNAL_KEYS * per_key + 2 * (SETS_BUDGET + math.ceil(len(params) / 8)) + 64
    # The checkpoint header is JSON inside a JSON string: escaping may double it.
    return entries + 2 * (names + HEADER_ALLOWANCE * max(1, groups)) + journal + 8


def check_header_room(params: Sequence[tuple[str, Sequence[int]]], groups: int = 1) -> None:
    """422 ``invalid_spec`` unless every checkpoint of such a stepper stays readable: its
    header under the ceiling of safetensors readers, whatever its state and journal."""
    bound = header_bound(params, groups)
    if bound > codec.MAX_HEADER_BYTES:
        raise InvalidSpec(
            f"{len(params)} parameters with these names would make the stepper's checkpoint "
            f"header up to {bound} bytes, over the {codec.MAX_HEADER_BYTES} bytes safetensors "
            "readers accept: use fewer parameters or shorter names"
        )


def check(condition: bool, detail: str) -> None:
    """422 ``invalid_checkpoint`` with ``detail`` unless ``condition``."""
    if not condition:
        raise InvalidCheckpoint(detail)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """A finite number that fits a float64 and, if an integer, an int64."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    return -_INT64 <= x <= _INT64 if isinstance(x, int) else math.isfinite(x)


_INT64 = 2**63 - 1


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def parse_header(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The checkpoint header from a file's ``__metadata__``, every field checked."""
    raw = metadata.get(META_CHECKPOINT)
    check(raw is not None, f"not an adamscope checkpoint: __metadata__ lacks {META_CHECKPOINT!r}")
    assert raw is not None
    try:
        h = codec.load_json(raw, "checkpoint header")
    except codec.CodecError as e:
        raise InvalidCheckpoint(str(e)) from None
    check(isinstance(h, dict), "checkpoint header must be a JSON object")
    check(h.get("format") == FORMAT, f"checkpoint format is {h.get('format')!r}, not {FORMAT!r}")
    version = h.get("version")
    check(
        _is_int(version) and 1 <= version <= _INT64,
        f"invalid checkpoint format version {version!r}",
    )
    check(
        version <= FORMAT_VERSION,
        f"checkpoint format version {version} is newer than this service reads "
        f"({FORMAT_VERSION}): upgrade adamscope",
    )
    name = h.get("stepper")
    check(
        isinstance(name, str) and _NAME.fullmatch(name) is not None,
        f"checkpoint names an invalid stepper {name!r}",
    )
    check(
        h.get("optimizer") in OPTIMIZERS, f"checkpoint has unknown optimizer {h.get('optimizer')!r}"
    )
    check(isinstance(h.get("device"), str), "checkpoint lacks a device")
    params = h.get("params")
    check(
        _str_list(params) and len(params) > 0 and len(set(params)) == len(params),
        "checkpoint 'params' must list distinct parameter names",
    )
    for n in params:
        check(_PARAM_NAME.fullmatch(n) is not None, f"invalid parameter name {n!r}")
    groups = h.get("groups")
    check(isinstance(groups, list) and len(groups) > 0, "checkpoint 'groups' must be a list")
    for g in groups:
        check(
            isinstance(g, dict)
            and _str_list(g.get("params"))
            and isinstance(g.get("options"), dict),
            "each checkpoint group needs 'params' (names) and 'options' (an object)",
        )
        for key, value in g["options"].items():
            check(key in OPTION_NAMES, f"checkpoint group has unknown option {key!r}")
            ok = (
                isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
                if key == "betas"
                else value is None or isinstance(value, bool) or _is_number(value)
            )
            check(ok, f"checkpoint option {key}={value!r} has the wrong type")
    step = h.get("step")
    check(
        _is_int(step) and 0 <= step <= _INT64,
        f"checkpoint step must be an integer in 0..2**63-1, got {step!r}",
    )
    for key in ("created_at", "updated_at", "saved_at"):
        check(_is_number(h.get(key)), f"checkpoint {key!r} must be a finite number")
    check(isinstance(h.get("extra", {}), dict), "checkpoint 'extra' must be an object")
    check(isinstance(h.get("idempotency", {}), dict), "checkpoint 'idempotency' must be an object")
    h.setdefault("extra", {})
    return h  # type: ignore[no-any-return]
