"""The safetensors wire codec and the JSON tensor form (client.codec).

The codec is the only way tensors enter the service, so it must round-trip every dtype the
wire carries exactly (bit for bit), interoperate with the reference ``safetensors`` library
in both directions, and turn every malformed body into a :class:`CodecError` that says what
is wrong (the API reports it as 400 malformed_body) instead of crashing or misreading bytes.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import safetensors.torch
import torch

from adamscope.client import codec
from adamscope.client.codec import CodecError

ALL_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaNs, -0.0 and bf16 payloads compare exactly)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic values that use the dtype's whole width (and its specials for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.complex64).to(dtype)
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.reshape(-1)
        specials = [math.nan, math.inf, -math.inf, -0.0]
        flat[: min(len(specials), flat.numel())] = torch.tensor(
            specials[: flat.numel()], dtype=torch.float64
        ).to(dtype)
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    flat = t.reshape(-1)
    if flat.numel() >= 2:
        flat[0], flat[1] = info.min, info.max
    return t


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=codec.dtype_name)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 5)], ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape)
    tensors, metadata = codec.decode(codec.encode({"t": t}))
    assert metadata == {}
    assert list(tensors) == ["t"]
    assert_same(tensors["t"], t)


def test_round_trip_keeps_order_metadata_and_every_dtype_together() -> None:
    tensors = {
        f"{codec.dtype_name(dt)}.{i}": sample(dt, (i + 1, 2), seed=i)
        for i, dt in enumerate(reversed(ALL_DTYPES))
    }
    metadata = {"adamscope.step": "12", "note": "ünïcode ✓", "empty": ""}
    out, meta = codec.decode(codec.encode(tensors, metadata))
    assert meta == metadata
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert_same(out[k], t)


def test_data_section_is_eight_byte_aligned() -> None:
    body = codec.encode({"a": torch.ones(3, dtype=torch.float16)}, {"k": "v"})
    (n,) = struct.unpack("<Q", body[:8])
    assert (8 + n) % 8 == 0
    assert len(body) == 8 + n + 6


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(20.0)[3::4],
        lambda: torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)[:, 1:, ::2],
        lambda: torch.ones(3, dtype=torch.bfloat16).expand(2, 3),
        lambda: torch.randn(
            4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.complex64
        ).t(),
        lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        lambda: torch._neg_view(torch.tensor([1.0, -2.0, 0.5])),
        lambda: torch.ones(2, 2, requires_grad=True) * 3,
    ],
    ids=[
        "transposed",
        "strided",
        "sliced-3d",
        "expanded",
        "complex-t",
        "conj-view",
        "neg-view",
        "requires-grad",
    ],
)
def test_non_contiguous_and_view_inputs_encode_their_values(make: Any) -> None:
    t = make()
    out, _ = codec.decode(codec.encode({"x": t}))
    expected = t.detach().resolve_conj().resolve_neg().contiguous()
    assert_same(out["x"], expected)
    assert out["x"].is_contiguous()


def test_decoded_tensors_are_fresh_and_writable() -> None:
    body = bytearray(codec.encode({"a": torch.arange(4.0)}))
    out, _ = codec.decode(body)
    body[-4:] = b"\0\0\0\0"  # the decoded tensor must not alias the request buffer
    out["a"] += 1
    assert torch.equal(out["a"], torch.arange(4.0) + 1)


def test_decode_accepts_memoryview_and_bytearray() -> None:
    body = codec.encode({"a": torch.arange(3, dtype=torch.int16)})
    for form in (bytes(body), bytearray(body), memoryview(body)):
        out, _ = codec.decode(form)
        assert torch.equal(out["a"], torch.arange(3, dtype=torch.int16))


# -------------------------------------------------------------- safetensors library interop


def _library_tensors() -> dict[str, torch.Tensor]:
    return {
        f"p{i}.{codec.dtype_name(dt)}": sample(dt, (3, 2), seed=i)
        for i, dt in enumerate(ALL_DTYPES)
    } | {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def test_library_bodies_decode_here() -> None:
    tensors = _library_tensors()
    body = safetensors.torch.save(tensors, metadata={"format": "pt", "adamscope.step": "3"})
    out, meta = codec.decode(body)
    assert meta == {"format": "pt", "adamscope.step": "3"}
    assert set(out) == set(tensors)
    for k, t in tensors.items():
        assert_same(out[k], t)


def test_library_body_without_metadata_decodes_here() -> None:
    out, meta = codec.decode(safetensors.torch.save({"a": torch.ones(2)}))
    assert meta == {}
    assert torch.equal(out["a"], torch.ones(2))


def test_bodies_written_here_load_with_the_library() -> None:
    tensors = _library_tensors()
    tensors["transposed"] = torch.arange(6.0).reshape(2, 3).t()
    body = codec.encode(tensors, {"k": "v"})
    out = safetensors.torch.load(body)
    assert set(out) == set(tensors)
    for k, t in tensors.items():
        assert_same(out[k], t.contiguous())


# ---------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize("dtype", [torch.complex128, torch.uint16, torch.float8_e4m3fn])
def test_encode_refuses_dtypes_the_wire_does_not_carry(dtype: torch.dtype) -> None:
    with pytest.raises(CodecError, match=f"dtype {codec.dtype_name(dtype)}.*cannot carry"):
        codec.encode({"x": torch.zeros(2).to(dtype)})


def test_encode_refuses_reserved_name_and_non_string_metadata() -> None:
    with pytest.raises(CodecError, match="'__metadata__' is reserved"):
        codec.encode({"__metadata__": torch.zeros(1)})
    with pytest.raises(CodecError, match="metadata must map strings to strings"):
        codec.encode({"a": torch.zeros(1)}, {"k": 1})  # type: ignore[dict-item]


def test_dtype_names() -> None:
    assert codec.dtype_from_name("bfloat16") is torch.bfloat16
    assert codec.dtype_name(torch.complex64) == "complex64"
    with pytest.raises(CodecError, match=r"unknown dtype 'float128'; expected one of: .*float32"):
        codec.dtype_from_name("float128")


# ------------------------------------------------------------------------ malformed bodies


def body_of(
    header: Any, data: bytes = b"", *, raw_header: bytes | None = None, claimed: int | None = None
) -> bytes:
    """A hand-built safetensors body (header JSON, or raw header bytes, then data)."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(head) if claimed is None else claimed
    return struct.pack("<Q", n) + head + data


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "too short"),
    ("seven-bytes", b"\x01" * 7, "too short"),
    (
        "header-beyond-body",
        body_of(None, raw_header=b"{}", claimed=100),
        "claims 100 bytes but the body has only 2",
    ),
    ("header-over-ceiling", struct.pack("<Q", codec.MAX_HEADER_BYTES + 1), "exceeds"),
    ("not-json", body_of(None, raw_header=b"{not json"), "not valid JSON"),
    ("not-utf8", body_of(None, raw_header=b'{"\xff": 1}'), "not valid JSON"),
    ("header-array", body_of([1, 2]), "must be a JSON object"),
    ("header-string", body_of("x"), "must be a JSON object"),
    ("entry-not-object", body_of({"a": 5}), "entry for 'a' must be an object"),
    (
        "unknown-dtype",
        body_of({"a": entry("F8_E4M3", (2,), (0, 2))}, b"\0\0"),
        "unsupported dtype 'F8_E4M3'",
    ),
    (
        "missing-dtype",
        body_of({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "unsupported dtype None",
    ),
    ("negative-dim", body_of({"a": entry(shape=[-2])}, b"\0" * 8), "invalid shape [-2]"),
    ("float-dim", body_of({"a": entry(shape=[2.0])}, b"\0" * 8), "invalid shape [2.0]"),
    ("bool-dim", body_of({"a": entry(shape=[True])}, b"\0" * 4), "invalid shape [True]"),
    ("shape-not-list", body_of({"a": entry(shape="2")}, b"\0" * 8), "invalid shape '2'"),
    ("offsets-one", body_of({"a": entry(offsets=[0])}, b"\0" * 8), "invalid data_offsets [0]"),
    (
        "offsets-float",
        body_of({"a": entry(offsets=[0, 8.0])}, b"\0" * 8),
        "invalid data_offsets [0, 8.0]",
    ),
    (
        "offsets-short-for-shape",
        body_of({"a": entry(offsets=(0, 4))}, b"\0" * 4),
        "hold 4 bytes, but shape [2] of F32 needs 8",
    ),
    (
        "offsets-long-for-shape",
        body_of({"a": entry(offsets=(0, 12))}, b"\0" * 12),
        "hold 12 bytes, but shape [2] of F32 needs 8",
    ),
    ("offsets-reversed", body_of({"a": entry(offsets=(8, 0))}, b"\0" * 8), "data_offsets [8, 0]"),
    ("offsets-negative", body_of({"a": entry(offsets=(-8, 0))}, b"\0" * 8), "data_offsets [-8, 0]"),
    (
        "gap",
        body_of({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\0" * 20),
        "'b' starts at byte 12, expected 8: buffers overlap or leave a gap",
    ),
    (
        "overlap",
        body_of({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 12),
        "'b' starts at byte 4, expected 8: buffers overlap or leave a gap",
    ),
    (
        "not-from-zero",
        body_of({"a": entry(offsets=(4, 12))}, b"\0" * 12),
        "'a' starts at byte 4, expected 0",
    ),
    (
        "trailing-bytes",
        body_of({"a": entry()}, b"\0" * 9),
        "tensor data covers 8 bytes but the body carries 9",
    ),
    (
        "data-missing",
        body_of({"a": entry()}, b"\0" * 5),
        "tensor data covers 8 bytes but the body carries 5",
    ),
    (
        "duplicate-name",
        body_of(
            None,
            b"\0" * 8,
            raw_header=(
                b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
            ),
        ),
        "duplicate tensor name 'a'",
    ),
    (
        "metadata-non-string-value",
        body_of({"__metadata__": {"k": 1}}),
        "__metadata__ must map strings to strings",
    ),
    ("metadata-array", body_of({"__metadata__": []}), "__metadata__ must map strings to strings"),
    (
        "metadata-string",
        body_of({"__metadata__": "k=v"}),
        "__metadata__ must map strings to strings",
    ),
    (
        "metadata-nested",
        body_of({"__metadata__": {"k": {"x": "y"}}}),
        "__metadata__ must map strings to strings",
    ),
]


@pytest.mark.parametrize(
    ("body", "message"), [(b, m) for _, b, m in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_bodies_raise_codec_error_with_a_clear_message(body: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(body)
    assert message in str(info.value)


def test_the_hand_built_bodies_are_valid_once_fixed() -> None:
    """Guards the malformed cases: the same construction, done right, decodes."""
    out, meta = codec.decode(
        body_of(
            {"__metadata__": {"k": "v"}, "a": entry(), "b": entry("I64", (1,), (8, 16))},
            struct.pack("<ff", 1.5, -2.0) + struct.pack("<q", -7),
        )
    )
    assert meta == {"k": "v"}
    assert torch.equal(out["a"], torch.tensor([1.5, -2.0]))
    assert torch.equal(out["b"], torch.tensor([-7]))


def test_null_metadata_and_empty_tensors_sharing_an_offset_are_valid() -> None:
    out, meta = codec.decode(
        body_of(
            {
                "__metadata__": None,
                "e1": entry(shape=[0, 3], offsets=(0, 0)),
                "a": entry(),
                "e2": entry("F16", [2, 0], (8, 8)),
            },
            b"\0" * 8,
        )
    )
    assert meta == {}
    assert out["e1"].shape == (0, 3) and out["e2"].shape == (2, 0)
    assert out["e2"].dtype == torch.float16


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# ------------------------------------------------------------------------ JSON tensor form


def _json_round_trip(t: torch.Tensor) -> torch.Tensor:
    doc = codec.tensor_to_json(t)
    # Strict JSON: non-finite values must already be spelled as strings.
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    return codec.tensor_from_json(back["data"], codec.dtype_from_name(back["dtype"]), back["shape"])


def assert_same_up_to_nan_payload(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact except that every NaN is one NaN ("NaN" in JSON has no sign or payload)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ra = torch.view_as_real(a) if a.is_complex() else a
    rb = torch.view_as_real(b) if b.is_complex() else b
    assert torch.equal(ra.isnan(), rb.isnan())
    keep = ~ra.isnan()
    assert torch.equal(bits(ra[keep]), bits(rb[keep]))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64],
    ids=codec.dtype_name,
)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (9,), (3, 4)], ids=str)
def test_json_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape, seed=7)
    back = _json_round_trip(t)
    assert_same_up_to_nan_payload(back, t)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=codec.dtype_name
)
def test_json_keeps_extremes_and_specials(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    values = [
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        0.0,
        info.max,
        -info.max,
        info.tiny,
        info.smallest_normal / 4,
        info.eps,
        1 + info.eps,
    ]
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    doc = codec.tensor_to_json(t)
    assert doc["dtype"] == codec.dtype_name(dtype) and doc["shape"] == [len(values)]
    assert doc["data"][:3] == ["NaN", "Infinity", "-Infinity"]
    back = _json_round_trip(t)
    assert_same_up_to_nan_payload(back, t)
    assert math.copysign(1.0, float(back[3])) == -1.0  # -0.0 keeps its sign


def test_json_complex_is_real_imag_pairs_with_specials() -> None:
    t = torch.tensor(
        [complex(1.5, -2.0), complex(math.nan, math.inf), complex(-0.0, 3e-39)],
        dtype=torch.complex64,
    )
    doc = codec.tensor_to_json(t)
    assert doc["data"][0] == [1.5, -2.0]
    assert doc["data"][1] == ["NaN", "Infinity"]
    assert_same_up_to_nan_payload(_json_round_trip(t), t)


def test_json_float32_values_print_as_their_exact_value() -> None:
    t = torch.tensor([0.1], dtype=torch.float32)
    (value,) = codec.tensor_to_json(t)["data"]
    assert value == float(t.item())  # 0.10000000149011612: no rounding to 0.1
    assert torch.tensor(value, dtype=torch.float64).to(torch.float32).item() == t.item()


def test_json_scalar_shape_check() -> None:
    assert codec.tensor_from_json(2.5, torch.float32, []).shape == ()
    with pytest.raises(CodecError, match=r"tensor data has shape \[\], expected \[1\]"):
        codec.tensor_from_json(2.5, torch.float32, [1])


@pytest.mark.parametrize(
    ("data", "shape", "message"),
    [
        ([1.0, "fast"], None, "unexpected string 'fast' in tensor data"),
        ([1.0, True], None, "unexpected value True in tensor data"),
        ([1.0, None], None, "unexpected value None in tensor data"),
        ({"x": 1}, None, "unexpected value"),
        ([[1.0, 2.0], [3.0]], None, "not a regular nested list of numbers"),
        ([1.0, 2.0, 3.0], [2], r"tensor data has shape \[3\], expected \[2\]"),
        ([], [2, 3], r"tensor data has shape \[0\], expected \[2, 3\]"),
        ([], [-1, 0], r"tensor data has an invalid shape \[-1, 0\]"),
    ],
    ids=["string", "bool", "null", "object", "ragged", "shape", "empty-vs-full", "negative"],
)
def test_json_bad_data_raises_codec_error(data: Any, shape: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.tensor_from_json(data, torch.float32, shape)
