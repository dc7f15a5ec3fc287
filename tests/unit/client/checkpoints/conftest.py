"""The FSDP2 job's run, shared by the DCP tests of this folder and tests/client."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_support import run_fsdp_job


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank FSDP2 AdamW job: 3 steps, DCP saved (nested and flattened), 2 more steps."""
    out = tmp_path_factory.mktemp("fsdp")
    seconds = run_fsdp_job(out, "train", "3", "2")
    print(f"\nFSDP2 train job: {seconds:.1f} s wall")
    return out
