"""The distributed service as a Ray Serve application, for ``serve run`` and ``serve deploy``.

``adamscope serve --ray`` starts Ray Serve itself; on a cluster that Ray operators already
run, the same application deploys the Ray way, from a Serve config file whose
``import_path`` is this module's :func:`app` (an application builder) and whose ``args``
are :class:`ServeArgs`::

    applications:
      - name: adamscope
        route_prefix: /
        import_path: adamscope.service.distributed.serve_config:app
        args:
          slots: 4
          slot_gpus: 1
          settings: {data_dir: /shared/adamscope-data, tokens_file: /etc/adamscope/tokens.toml}

``settings`` are the service's settings (the ``ADAMSCOPE_*`` variables, lower-cased and
without the prefix); what they leave out comes from the environment of the process that
builds the application (a ``runtime_env``'s ``env_vars`` reach it), then the defaults.
The slots' resources are resolved against the cluster's when the ingress replica starts
(where Ray runs), as the CLI resolves them. Deleting the application (``serve delete``,
``serve shutdown``, or Ctrl-C in ``serve run``) stops the slots gracefully: each writes
what its durability policy still owes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..auth import binding_problem, load_access
from ..settings import Settings
from .cluster import ClusterConfig
from .serve import deployment

__all__ = ["ServeArgs", "app", "cluster_config", "slot_config"]


class ServeArgs(BaseModel):
    """The ``args`` of the Serve config's application (the CLI's ``--ray`` options)."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(0, ge=0, description="slot actors; 0: one per GPU, else 2")
    slot_cpus: float = Field(0.0, ge=0, description="CPUs per slot actor")
    slot_gpus: float = Field(0.0, ge=0, description="GPUs per slot actor; 0: packed onto GPUs")
    slot_bind: str = Field(
        "auto", description="the address each slot's service listens on ('auto': its node's)"
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="service settings (names of ADAMSCOPE_* lower-cased)"
    )


def _said(error: ValidationError) -> str:
    """A validation error on one line: ``field: what is wrong; ...``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'args'}: {e['msg']}" for e in error.errors()
    )


def cluster_config(args: ServeArgs) -> ClusterConfig:
    """The ingress's configuration for ``args``; raises ``ValueError`` saying what is wrong
    (unknown settings, invalid values, slots off loopback without tokens)."""
    unknown = sorted(set(args.settings) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown service settings in args.settings: {', '.join(unknown)}")
    try:
        settings = Settings(**args.settings)
    except ValidationError as e:
        raise ValueError(f"invalid service settings: {_said(e)}") from None
    return slot_config(settings, args.slots, args.slot_bind, args.slot_cpus, args.slot_gpus)


def slot_config(
    settings: Settings, slots: int, bind: str, num_cpus: float, num_gpus: float
) -> ClusterConfig:
    """The ingress's configuration for slots serving ``settings`` on ``bind`` (the CLI's
    and the Serve config's); raises ``ValueError`` when slots listening off loopback
    would have no tokens, as the service itself refuses to."""
    problem = binding_problem(settings.model_copy(update={"host": bind}), load_access(settings))
    if problem is not None:
        raise ValueError(f"slot services: {problem}")
    data = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    return ClusterConfig(
        settings=data.model_dump(mode="json"),
        slots=slots,
        bind=bind,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: the ingress bound to the configuration ``args``."""
    try:
        parsed = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"invalid adamscope args: {_said(e)}") from None
    return deployment(cluster_config(parsed), resolve=True)
