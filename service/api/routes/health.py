"""``GET /healthz``: liveness and basic facts (public)."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Depends, Request

from ... import __version__
from ...errors import clean_detail
from ..access import AccessDenied, authenticate, require
from ..deps import persistence, registry, settings

__all__ = ["router"]

router = APIRouter(tags=["service"])


@router.get(
    "/healthz",
    summary="Liveness and basic facts",
    description="Public. Steppers whose restore failed are counted for everyone, "
    "and named only to a caller whose token could list them.",
    dependencies=[Depends(require("public"))],
)
async def healthz(request: Request) -> dict[str, Any]:
    stored: dict[str, Any] = persistence(request).health()
    try:
        who = authenticate(request.app.state.access, request.headers.get("authorization"))
    except AccessDenied:
        who = None
    failed = stored["failed"]
    return {
        "status": "ok",
        "version": __version__,
        "torch": torch.__version__,
        "default_device": settings(request).default_device(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "steppers": len(registry(request)),
        "persistence": {
            **stored,
            "failed": [
                {**f, "error": clean_detail(f["error"])}
                for f in failed
                if who is not None and who.reaches(f["stepper"])
            ],
            "failed_count": len(failed),
        },
    }
