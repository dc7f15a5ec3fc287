"""Error codes (shared with the service) and the exceptions the client raises.

Every rejected request comes back as RFC 9457 ``application/problem+json`` with a stable
``code``; the client turns it into one exception class per code::

    AdamscopeError
    ├── TransportError            the request did not get an HTTP answer (connect, timeout)
    ├── ProtocolError             the answer was not what the contract promises
    └── APIStatusError            a problem+json answer; .status, .code, .problem
        ├── BadRequestError (400)
        │   └── MalformedBodyError             malformed_body
        ├── NotFoundError (404)
        │   └── StepperNotFoundError           stepper_not_found
        ├── ConflictError (409)
        │   └── StepperExistsError             stepper_exists
        ├── PayloadTooLargeError (413)         payload_too_large
        ├── UnprocessableError (422)
        │   ├── RequestValidationError         request_validation_error
        │   ├── JsonTooLargeError              json_too_large
        │   ├── InvalidHyperparameterError     invalid_hyperparameter
        │   ├── UnknownParameterError          unknown_parameter
        │   ├── DuplicateNameError             duplicate_name
        │   ├── ShapeMismatchError             shape_mismatch
        │   ├── DtypeMismatchError             dtype_mismatch
        │   ├── InvalidStateError              invalid_state
        │   ├── InvalidSpecError               invalid_spec
        │   └── DeviceUnavailableError         device_unavailable
        └── ServerError (5xx)                  internal_error
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CODES",
    "APIStatusError",
    "AdamscopeError",
    "BadRequestError",
    "ConflictError",
    "DeviceUnavailableError",
    "DtypeMismatchError",
    "DuplicateNameError",
    "InvalidHyperparameterError",
    "InvalidSpecError",
    "InvalidStateError",
    "JsonTooLargeError",
    "MalformedBodyError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RequestValidationError",
    "ServerError",
    "ShapeMismatchError",
    "StepperExistsError",
    "StepperNotFoundError",
    "TransportError",
    "UnknownParameterError",
    "UnprocessableError",
    "error_from_problem",
]

#: code -> (HTTP status, title). The service answers with exactly these.
CODES: dict[str, tuple[int, str]] = {
    "malformed_body": (400, "Malformed request body"),
    "stepper_not_found": (404, "Stepper not found"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "stepper_exists": (409, "Stepper already exists"),
    "payload_too_large": (413, "Payload too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "request_validation_error": (422, "Request validation failed"),
    "invalid_hyperparameter": (422, "Invalid hyperparameter"),
    "json_too_large": (422, "Too large for JSON"),
    "unknown_parameter": (422, "Unknown parameter"),
    "duplicate_name": (422, "Duplicate name"),
    "shape_mismatch": (422, "Shape mismatch"),
    "dtype_mismatch": (422, "Dtype mismatch"),
    "invalid_state": (422, "Invalid optimizer state"),
    "invalid_spec": (422, "Invalid stepper specification"),
    "device_unavailable": (422, "Device unavailable"),
    "internal_error": (500, "Internal server error"),
}


class AdamscopeError(Exception):
    """Base of every exception the client raises."""


class TransportError(AdamscopeError):
    """No HTTP response arrived (connection refused or reset, timeout)."""


class ProtocolError(AdamscopeError):
    """The server answered with something the wire contract does not allow."""


class APIStatusError(AdamscopeError):
    """The server rejected the request with a problem+json body."""

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.status: int = int(problem.get("status", 0))
        self.code: str = str(problem.get("code", "unknown"))
        self.detail: str = str(problem.get("detail", ""))
        super().__init__(f"{self.status} {self.code}: {self.detail}")


class BadRequestError(APIStatusError):
    pass


class MalformedBodyError(BadRequestError):
    pass


class NotFoundError(APIStatusError):
    pass


class StepperNotFoundError(NotFoundError):
    pass


class ConflictError(APIStatusError):
    pass


class StepperExistsError(ConflictError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableError(APIStatusError):
    pass


class RequestValidationError(UnprocessableError):
    pass


class JsonTooLargeError(UnprocessableError):
    pass


class InvalidHyperparameterError(UnprocessableError):
    pass


class UnknownParameterError(UnprocessableError):
    pass


class DuplicateNameError(UnprocessableError):
    pass


class ShapeMismatchError(UnprocessableError):
    pass


class DtypeMismatchError(UnprocessableError):
    pass


class InvalidStateError(UnprocessableError):
    pass


class InvalidSpecError(UnprocessableError):
    pass


class DeviceUnavailableError(UnprocessableError):
    pass


class ServerError(APIStatusError):
    pass


_BY_CODE: dict[str, type[APIStatusError]] = {
    "malformed_body": MalformedBodyError,
    "stepper_not_found": StepperNotFoundError,
    "stepper_exists": StepperExistsError,
    "payload_too_large": PayloadTooLargeError,
    "request_validation_error": RequestValidationError,
    "json_too_large": JsonTooLargeError,
    "invalid_hyperparameter": InvalidHyperparameterError,
    "unknown_parameter": UnknownParameterError,
    "duplicate_name": DuplicateNameError,
    "shape_mismatch": ShapeMismatchError,
    "dtype_mismatch": DtypeMismatchError,
    "invalid_state": InvalidStateError,
    "invalid_spec": InvalidSpecError,
    "device_unavailable": DeviceUnavailableError,
    "internal_error": ServerError,
}

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableError,
}


def error_from_problem(problem: dict[str, Any]) -> APIStatusError:
    """The most specific exception for a problem body: by code, else by status."""
    cls = _BY_CODE.get(str(problem.get("code")))
    if cls is None:
        status = int(problem.get("status", 0))
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    return cls(problem)
