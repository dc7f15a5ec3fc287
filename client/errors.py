"""Error codes (shared with the service) and the exceptions the client raises.

Every rejected request comes back as RFC 9457 ``application/problem+json`` with a stable
``code``; the client turns it into one exception class per code::

    AdamscopeError
    ├── TransportError            the request did not get an HTTP answer (connect, timeout)
    ├── ProtocolError             the answer was not what the contract promises
    └── APIStatusError            a problem+json answer; .status, .code, .problem
        ├── BadRequestError (400)
        │   └── MalformedBodyError             malformed_body
        ├── UnauthorizedError (401)            unauthorized: no valid bearer token
        ├── ForbiddenError (403)               forbidden: token scope or prefix too narrow
        ├── NotFoundError (404)
        │   ├── StepperNotFoundError           stepper_not_found
        │   └── SnapshotNotFoundError          snapshot_not_found
        ├── RequestTimeoutError (408)         request_timeout: the body stalled
        ├── ConflictError (409)
        │   ├── StepperExistsError             stepper_exists
        │   └── SnapshotExistsError            snapshot_exists
        ├── PayloadTooLargeError (413)         payload_too_large
        │   └── TensorTooLargeError            tensor_too_large
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
        │   ├── InvalidCheckpointError         invalid_checkpoint
        │   └── DeviceUnavailableError         device_unavailable
        └── ServerError (5xx)                  internal_error
            ├── PersistenceFailedError (500)   persistence_failed: applied, not on disk
            ├── ShardsDivergedError (500)      shards_diverged: resend with the same key
            ├── NotSupportedShardedError (501) not_supported_sharded: a sharded stepper
            ├── SlotUnavailableError (503)     slot_unavailable: a slot is being restored
            └── InsufficientStorageError (507) not worth retrying: a quota is full
                ├── StepperLimitError          stepper_limit
                ├── MemoryBudgetExceededError  memory_budget_exceeded
                └── DeviceOutOfMemoryError     device_out_of_memory: the GPU is full
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CODES",
    "APIStatusError",
    "AdamscopeError",
    "BadRequestError",
    "ConflictError",
    "DeviceOutOfMemoryError",
    "DeviceUnavailableError",
    "DtypeMismatchError",
    "DuplicateNameError",
    "ForbiddenError",
    "InsufficientStorageError",
    "InvalidCheckpointError",
    "InvalidHyperparameterError",
    "InvalidSpecError",
    "InvalidStateError",
    "JsonTooLargeError",
    "MalformedBodyError",
    "MemoryBudgetExceededError",
    "NotSupportedShardedError",
    "NotFoundError",
    "PersistenceFailedError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RequestTimeoutError",
    "RequestValidationError",
    "ServerError",
    "ShapeMismatchError",
    "ShardsDivergedError",
    "SlotUnavailableError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "StepConflictError",
    "StepperFrozenError",
    "StepperExistsError",
    "StepperLimitError",
    "TensorTooLargeError",
    "StepperNotFoundError",
    "TransportError",
    "UnauthorizedError",
    "UnknownParameterError",
    "UnprocessableError",
    "error_from_problem",
]

#: code -> (HTTP status, title). The service answers with exactly these.
CODES: dict[str, tuple[int, str]] = {
    "malformed_body": (400, "Malformed request body"),
    "unauthorized": (401, "Unauthorized"),
    "forbidden": (403, "Forbidden"),
    "stepper_not_found": (404, "Stepper not found"),
    "not_found": (404, "Not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "request_timeout": (408, "Request timeout"),
    "stepper_exists": (409, "Stepper already exists"),
    "step_conflict": (409, "Step conflict"),
    "stepper_frozen": (409, "Stepper frozen"),
    "stepper_watched": (409, "Stepper watched"),
    "command_not_found": (404, "Command not found"),
    "trainer_timeout": (504, "Trainer did not answer"),
    "snapshot_not_found": (404, "Snapshot not found"),
    "snapshot_exists": (409, "Snapshot already exists"),
    "invalid_checkpoint": (422, "Invalid checkpoint file"),
    "persistence_failed": (500, "Persistence failed"),
    "payload_too_large": (413, "Payload too large"),
    "tensor_too_large": (413, "Tensor too large"),
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
    "stepper_limit": (507, "Stepper limit reached"),
    "memory_budget_exceeded": (507, "Memory budget exceeded"),
    "device_out_of_memory": (507, "Device out of memory"),
    # The distributed mode (adamscope serve --ray): its ingress's own answers.
    "shards_diverged": (500, "Shards diverged"),
    "not_supported_sharded": (501, "Not supported for a sharded stepper"),
    "slot_unavailable": (503, "Slot unavailable"),
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


class UnauthorizedError(APIStatusError):
    """No valid bearer token (tokens are configured on the service)."""


class ForbiddenError(APIStatusError):
    """The token's scope is too low, or the stepper is outside the token's name prefix."""


class NotFoundError(APIStatusError):
    pass


class StepperNotFoundError(NotFoundError):
    pass


class SnapshotNotFoundError(NotFoundError):
    pass


class ConflictError(APIStatusError):
    pass


class SnapshotExistsError(ConflictError):
    pass


class StepperExistsError(ConflictError):
    pass


class StepperFrozenError(ConflictError):
    """A step sent to a frozen stepper (an imported checkpoint); make it ``hosted`` first
    (``Client.set_kind(name, "hosted")``)."""


class StepConflictError(ConflictError):
    """The step was built on a stale view (``current_step`` says where the stepper is), or
    a contribution does not fit the pending step."""

    @property
    def current_step(self) -> int | None:
        value = self.problem.get("current_step")
        return int(value) if value is not None else None


class RequestTimeoutError(APIStatusError):
    """The request's body stopped arriving (``body_timeout``); nothing was applied."""


class PayloadTooLargeError(APIStatusError):
    pass


class TensorTooLargeError(PayloadTooLargeError):
    pass


class UnprocessableError(APIStatusError):
    pass


class InvalidCheckpointError(UnprocessableError):
    """An uploaded or stored checkpoint file is not a valid adamscope checkpoint (or does
    not fit the stepper it is restored into)."""


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


class PersistenceFailedError(ServerError):
    """The change was applied in memory but could not be written to the data directory
    (disk full, I/O error); the service retries the write with the next change."""


class ShardsDivergedError(ServerError):
    """Some shards of a sharded stepper applied a step that others refused: send the same
    request again (same Idempotency-Key) to complete it."""


class NotSupportedShardedError(ServerError):
    """The route is not available for a sharded stepper (the problem says why)."""


class SlotUnavailableError(ServerError):
    """A slot of the distributed service did not answer (its steppers are being restored
    from their files): retry the request."""


class InsufficientStorageError(ServerError):
    """507: a quota of the service is exhausted; retrying the same request cannot help."""


class StepperLimitError(InsufficientStorageError):
    pass


class MemoryBudgetExceededError(InsufficientStorageError):
    pass


class DeviceOutOfMemoryError(InsufficientStorageError):
    """The stepper's device ran out of memory; the request changed nothing (unless the
    problem says ``partial``: PyTorch's update had begun, see the service's docs)."""


_BY_CODE: dict[str, type[APIStatusError]] = {
    "malformed_body": MalformedBodyError,
    "unauthorized": UnauthorizedError,
    "forbidden": ForbiddenError,
    "stepper_not_found": StepperNotFoundError,
    "stepper_exists": StepperExistsError,
    "step_conflict": StepConflictError,
    "stepper_frozen": StepperFrozenError,
    "payload_too_large": PayloadTooLargeError,
    "request_timeout": RequestTimeoutError,
    "tensor_too_large": TensorTooLargeError,
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
    "snapshot_not_found": SnapshotNotFoundError,
    "snapshot_exists": SnapshotExistsError,
    "invalid_checkpoint": InvalidCheckpointError,
    "persistence_failed": PersistenceFailedError,
    "stepper_limit": StepperLimitError,
    "memory_budget_exceeded": MemoryBudgetExceededError,
    "device_out_of_memory": DeviceOutOfMemoryError,
    "shards_diverged": ShardsDivergedError,
    "not_supported_sharded": NotSupportedShardedError,
    "slot_unavailable": SlotUnavailableError,
}

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableError,
    507: InsufficientStorageError,
}


def error_from_problem(problem: dict[str, Any]) -> APIStatusError:
    """The most specific exception for a problem body: by code, else by status."""
    cls = _BY_CODE.get(str(problem.get("code")))
    if cls is None:
        status = int(problem.get("status", 0))
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    return cls(problem)
