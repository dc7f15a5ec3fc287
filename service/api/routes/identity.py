"""``GET /v1/whoami``: the scope and name prefix of the request's token.

A browser cannot learn what its token may do without trying requests that change things;
this route tells it up front, so the dashboard shows the write and admin controls only to
tokens that may use them. It names the token by its configured label, never its value.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from adamscope.client.protocol import Identity

from ..access import principal, require

__all__ = ["router"]

router = APIRouter(tags=["service"])


@router.get(
    "/whoami",
    response_model=Identity,
    summary="The scope and stepper-name prefix of the token this request carries",
    dependencies=[Depends(require("read"))],
)
async def whoami(request: Request) -> dict[str, Any]:
    p = principal(request)
    return {
        "name": p.label,
        "scope": p.scope,
        "prefix": p.prefix,
        "reaches": p.reach(),
        "tokens": request.app.state.access.enabled,
    }
