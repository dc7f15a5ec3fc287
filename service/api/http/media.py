"""Media types and content negotiation: what a body is, and what a reply should be."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request

from adamscope.client.constants import OCTET

__all__ = ["OCTET", "TensorFormat", "binary_body_doc", "media_type", "wants_json"]

TensorFormat = Literal["safetensors", "json"]


def binary_body_doc(description: str, json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` documenting a safetensors request body (and optionally JSON)."""
    content: dict[str, Any] = {OCTET: {"schema": {"type": "string", "format": "binary"}}}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_json(request: Request, format: TensorFormat | None) -> bool:
    if format is not None:
        return format == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and OCTET not in accept
