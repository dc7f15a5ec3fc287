"""DCP directories from a real 2-rank FSDP2 job: read without a process group, write back."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpoint_local_job import TinyNet, make_optimizer, named_state, train
from checkpoint_support import assert_state_equal, load_full, run_fsdp_job
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from adamscope.client.checkpoints import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    from_optimizer,
    read_checkpoint,
    read_dcp,
    write_dcp,
)


@pytest.mark.parametrize("layout", ["dcp", "dcp_flat"])
def test_reads_fsdp2_dcp_bit_exactly(fsdp_run: Path, layout: str) -> None:
    values, state, groups = load_full(fsdp_run / "full_3.safetensors")
    ckpt = read_checkpoint(fsdp_run / layout)
    assert ckpt.provenance.format == "dcp"
    assert ckpt.kind == "adamw" and ckpt.global_step == 3
    got = {p.name: p.state for p in ckpt}
    assert assert_state_equal(got, state) == 8 * 3 + 4  # amsgrad group adds max_exp_avg_sq
    for name, value in values.items():
        assert torch.equal(ckpt.params[name].value, value), name
    assert [g.names for g in ckpt.groups] == [g["params"] for g in groups]
    for group, saved in zip(ckpt.groups, groups, strict=True):
        expected = {k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"}
        assert group.options == expected


def test_dcp_export_resumes_the_fsdp_job_bit_exactly(fsdp_run: Path, tmp_path: Path) -> None:
    exported = write_dcp(read_dcp(fsdp_run / "dcp"), tmp_path / "exported")
    seconds = run_fsdp_job(tmp_path / "resumed", "resume", str(exported), "3", "2")
    print(f"\nFSDP2 resume job: {seconds:.1f} s wall")
    values, state, _ = load_full(tmp_path / "resumed" / "full_final.safetensors")
    expected_values, expected_state, _ = load_full(fsdp_run / "full_final.safetensors")
    assert_state_equal(state, expected_state)
    for name, value in expected_values.items():
        assert torch.equal(values[name], value), name


@pytest.mark.parametrize("flatten", [False, True])
def test_write_then_read_dcp_keeps_everything(
    fsdp_run: Path, tmp_path: Path, flatten: bool
) -> None:
    original = read_dcp(fsdp_run / "dcp")
    again = read_dcp(write_dcp(original, tmp_path / "out", flatten=flatten, optim_key="optimizer"))
    assert [g.names for g in again.groups] == [g.names for g in original.groups]
    assert [g.options for g in again.groups] == [g.options for g in original.groups]
    assert_state_equal({p.name: p.state for p in again}, {p.name: p.state for p in original})
    for param in original:
        assert torch.equal(again.params[param.name].value, param.value)


def test_exported_dcp_loads_into_a_local_job_without_process_group(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = TinyNet()
    ref_opt = make_optimizer(reference, named=False)
    train(reference, ref_opt, range(1, 4))
    write_dcp(from_optimizer(ref_opt, reference.named_parameters()), tmp_path / "ckpt")
    train(reference, ref_opt, range(4, 7))

    torch.manual_seed(1)
    model = TinyNet()
    optimizer = make_optimizer(model, named=False)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    train(model, optimizer, range(4, 7))

    assert_state_equal(named_state(model, optimizer), named_state(reference, ref_opt))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def _marker_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil())


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "evil"
    target.mkdir()
    marker = tmp_path / "executed"
    (target / ".metadata").write_bytes(_marker_pickle(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system|nothing in it"):
        read_checkpoint(target)
    assert not marker.exists()
    # The same bytes do run under plain pickle: the test would catch an unrestricted load.
    pickle.loads((target / ".metadata").read_bytes())
    assert marker.exists()


class _Evil:
    """Pickles to a call of os.system; only an unrestricted load would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_dcp_value_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    state = {
        "optim": {
            "state": {"w": {"step": torch.tensor(1.0)}},
            "param_groups": [{"lr": _Evil(marker), "params": ["w"]}],
        },
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match="nothing in it was executed"):
        read_dcp(tmp_path / "ckpt")
    assert not marker.exists()


def test_torchtitan_layout_top_level_model_and_flattened_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = make_optimizer(model, named=False)
    train(model, optimizer, range(1, 3))
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(model, optimizer, options=flat)
    state = {**msd, "optimizer": osd, "train_state": {"step": torch.tensor(7)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
        dcp.save({"model": msd}, checkpoint_id=tmp_path / "model_only", no_dist=True)
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.global_step == 7  # train_state.step, not the optimizer's 2
    assert ckpt.provenance.details == {"optimizer_key": "optimizer", "weights_key": "<root>"}
    assert_state_equal({p.name: p.state for p in ckpt}, named_state(model, optimizer))
    for name, value in model.named_parameters():
        assert torch.equal(ckpt.params[name].value, value), name
    with pytest.raises(CheckpointFormatError, match="found no optimizer state"):
        read_checkpoint(tmp_path / "model_only")
