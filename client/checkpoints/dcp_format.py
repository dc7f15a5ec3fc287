"""PyTorch Distributed Checkpoint (DCP) directories, read and written in one process.

A job that saves ``dcp.save({"model": msd, "optim": osd})`` with ``msd, osd =
get_state_dict(model, optimizer)`` writes one ``__<rank>_0.distcp`` file per rank holding
that rank's shards, and a ``.metadata`` file mapping every flattened key to its chunks and
to its path in the original nested dict (``planner_data``). FSDP2's optimizer state comes
keyed by parameter FQN, in one of two layouts:

* nested (the default): ``optim.state.<fqn>.exp_avg`` at path
  ``("optim", "state", "<fqn>", "exp_avg")``, and ``optim.param_groups.<i>.lr`` /
  ``optim.param_groups.<i>.params`` (the list of FQNs) at ``("optim", "param_groups", i, ...)``;
* flattened (``StateDictOptions(flatten_optimizer_state_dict=True)``, torchtitan's choice):
  ``("optim", "state.<fqn>.exp_avg")`` and one ``("optim", "param_groups.<fqn>.lr")`` per
  parameter and option; the groups themselves are not saved and are rebuilt here from
  parameters with identical options, in first-seen order.

Reading allocates every saved tensor at its full size and lets DCP's own planner copy each
rank's chunks into it (what ``format_utils.dcp_to_torch_save`` does), with ``no_dist=True``
so no process group is needed. Unlike stock DCP, the ``.metadata`` pickle and the pickled
non-tensor values are loaded with restricted unpicklers (see ``unpickling``). The model's
weights are taken from the dict beside the optimizer's whose keys are the optimizer's FQNs
(``"model"`` above, or the root for torchtitan's top-level model keys).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from .checkpoint import (
    OptimizerCheckpoint,
    OptimizerKind,
    ParamGroup,
    ParamState,
    Provenance,
    infer_kind,
)
from .errors import CheckpointError, CheckpointFormatError
from .unpickling import load_dcp_metadata, load_torch_bytes

__all__ = ["read_dcp", "write_dcp"]

Tree = dict[Any, Any]
_PATH = tuple[Any, ...]


class _SafeReader(FileSystemReader):
    """A FileSystemReader handed metadata that was already read safely."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values are unpickled with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        self.state_dict[key] = load_torch_bytes(value, f"DCP value {key!r}")


def _load_flat(path: Path, metadata: Metadata) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            flat[key] = torch.empty(item.size, dtype=item.properties.dtype)
        else:
            flat[key] = None
    planner = _SafePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(
                flat, storage_reader=_SafeReader(path, metadata), planner=planner, no_dist=True
            )
    except CheckpointException as wrapped:
        # DCP wraps each rank's error; there is one rank here, and our own errors are the
        # ones worth showing (a refused pickle, say), not DCP's traceback dump.
        errors = [exc for exc, _ in wrapped.failures.values()]
        ours = next((e for e in errors if isinstance(e, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        raise CheckpointFormatError(f"{path}: DCP data unreadable ({errors})") from None
    return flat


def _unflatten(flat: dict[str, Any], planner_data: Any) -> Tree:
    tree: Tree = {}
    paths = planner_data if isinstance(planner_data, dict) else {}
    for key, value in flat.items():
        path: _PATH = tuple(paths.get(key, (key,)))
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _is_nested_optim(node: Tree) -> bool:
    return isinstance(node.get("state"), dict) and isinstance(node.get("param_groups"), dict)


def _is_flat_optim(node: Tree) -> bool:
    keys = [k for k in node if isinstance(k, str)]
    return any(k.startswith("state.") for k in keys) and any(
        k.startswith("param_groups.") for k in keys
    )


def _find_optimizers(node: Tree, path: _PATH = ()) -> list[_PATH]:
    if _is_nested_optim(node) or _is_flat_optim(node):
        return [path]
    found: list[_PATH] = []
    for key, child in node.items():
        if isinstance(child, dict):
            found += _find_optimizers(child, (*path, key))
    return found


def _get(tree: Tree, path: _PATH) -> Tree:
    for part in path:
        tree = tree[part]
    return tree


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, dict):  # a list DCP flattened element by element
        return [value[i] for i in sorted(value)]
    return list(value)


def _parse_nested(node: Tree) -> tuple[dict[str, dict[str, torch.Tensor]], list[ParamGroup]]:
    state = {str(fqn): dict(values) for fqn, values in node["state"].items()}
    groups = []
    for index in sorted(node["param_groups"]):
        saved = dict(node["param_groups"][index])
        names = [str(n) for n in _as_list(saved.pop("params", []))]
        saved.pop("param_names", None)
        groups.append(ParamGroup(names=names, options=saved))
    return state, groups


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, left in a.items():
        right = b[key]
        if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
            if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
                return False
            if not torch.equal(left, right):
                return False
        elif left != right:
            return False
    return True


def _parse_flat(node: Tree) -> tuple[dict[str, dict[str, torch.Tensor]], list[ParamGroup]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    options: dict[str, dict[str, Any]] = {}
    for key, value in node.items():
        if not isinstance(key, str) or "." not in key:
            continue
        section, _, rest = key.partition(".")
        fqn, _, leaf = rest.rpartition(".")
        if section == "state":
            state.setdefault(fqn, {})[leaf] = value
        elif section == "param_groups":
            options.setdefault(fqn, {})[leaf] = value
    groups: list[ParamGroup] = []
    for fqn, opts in options.items():
        group = next((g for g in groups if _same(g.options, opts)), None)
        if group is None:
            groups.append(ParamGroup(names=[fqn], options=opts))
        else:
            group.names.append(fqn)
    return state, groups


def _leaves(node: Tree, skip: _PATH | None, path: _PATH = ()) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, child in node.items():
        child_path = (*path, key)
        if child_path == skip:
            continue
        if isinstance(child, dict):
            for sub, tensor in _leaves(child, skip, child_path).items():
                out[f"{key}.{sub}"] = tensor
        elif isinstance(child, torch.Tensor):
            out[str(key)] = child
    return out


def _find_values(
    tree: Tree, optim_path: _PATH, names: list[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the dict (outside the optimizer's) whose keys cover the most names."""
    best: tuple[int, str, dict[str, torch.Tensor]] = (0, "", {})
    candidates: list[_PATH] = [()]
    while candidates:
        path = candidates.pop(0)
        node = _get(tree, path)
        # Relative to this node, the optimizer sits at the rest of its path, if under it.
        skip = optim_path[len(path) :] if optim_path[: len(path)] == path else None
        leaves = _leaves(node, skip)
        score = sum(name in leaves for name in names)
        where = ".".join(map(str, path)) or "<root>"
        if score > best[0] or (score == best[0] and score and path == ("model",)):
            best = (score, where, {n: leaves[n] for n in names if n in leaves})
        candidates += [
            (*path, k) for k, v in node.items() if isinstance(v, dict) and (*path, k) != optim_path
        ]
    return best[2], best[1]


def read_dcp(path: str | Path, *, kind: OptimizerKind | None = None) -> OptimizerCheckpoint:
    """Read an Adam/AdamW optimizer (and model weights, when saved) from a DCP directory."""
    path = Path(path)
    metadata = load_dcp_metadata(path)
    tree = _unflatten(_load_flat(path, metadata), metadata.planner_data)
    found = _find_optimizers(tree)
    if len(found) != 1:
        what = "no optimizer state" if not found else f"several optimizer states {found}"
        raise CheckpointFormatError(
            f"{path}: found {what} (looked for a dict with 'state' and 'param_groups', or "
            "with 'state.<fqn>...' and 'param_groups.<fqn>...' keys)"
        )
    optim_path = found[0]
    node = _get(tree, optim_path)
    provenance = Provenance("dcp", str(path))
    provenance.details["optimizer_key"] = ".".join(map(str, optim_path))
    if _is_nested_optim(node):
        state, groups = _parse_nested(node)
    else:
        state, groups = _parse_flat(node)
        provenance.inferred.append(
            "param groups rebuilt from the flattened per-parameter options: parameters with "
            "identical options form one group, in the order they were saved"
        )
    names = [n for g in groups for n in g.names]
    values, where = _find_values(tree, optim_path, names)
    if values:
        provenance.details["weights_key"] = where
    if len(values) < len(names):
        missing = [n for n in names if n not in values]
        provenance.inferred.append(f"no saved value for {len(missing)} parameters: {missing[:5]}")
    params = {n: ParamState(name=n, value=values.get(n), state=state.get(n, {})) for n in names}
    for extra in sorted(set(state) - set(names)):
        params[extra] = ParamState(name=extra, state=state[extra])  # validate() reports it
    resolved, why = infer_kind(groups, kind)
    provenance.inferred.append(why)
    checkpoint = OptimizerCheckpoint(resolved, params, groups, _train_step(tree), provenance)
    if checkpoint.global_step is None:
        checkpoint.global_step = checkpoint.optimizer_step()
        if checkpoint.global_step is not None:
            provenance.inferred.append("global_step: the optimizer step shared by every parameter")
    checkpoint.validate()
    return checkpoint


def _train_step(tree: Tree) -> int | None:
    """torchtitan saves ``train_state.step``; use it as the training step when present."""
    train_state = tree.get("train_state")
    step = train_state.get("step") if isinstance(train_state, dict) else None
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        return int(step.item())
    return step if isinstance(step, int) else None


def write_dcp(
    checkpoint: OptimizerCheckpoint,
    path: str | Path,
    *,
    model_key: str = "model",
    optim_key: str = "optim",
    flatten: bool = False,
) -> Path:
    """Write ``{model_key: weights, optim_key: optimizer}`` as ``get_state_dict`` lays it out.

    A job loads it with ``dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)`` on
    ``msd, osd = get_state_dict(model, optimizer)`` and then ``set_state_dict``; DCP reshards
    to whatever sharding that job uses. ``flatten=True`` writes the
    ``flatten_optimizer_state_dict`` layout instead.
    """
    checkpoint.validate()
    path = Path(path)
    optim: dict[str, Any]
    if flatten:
        optim = {}
        for group in checkpoint.groups:
            for name in group.names:
                for key, tensor in checkpoint.params[name].state.items():
                    optim[f"state.{name}.{key}"] = tensor
                for option, value in group.options.items():
                    optim[f"param_groups.{name}.{option}"] = value
    else:
        # param_names too: get_state_dict lists them for an optimizer built from
        # named_parameters(), and dcp.load then asks for them (an unnamed one ignores them).
        optim = {
            "state": {p.name: dict(p.state) for p in checkpoint if p.state},
            "param_groups": [
                {**g.options, "params": list(g.names), "param_names": list(g.names)}
                for g in checkpoint.groups
            ],
        }
    state_dict: dict[str, Any] = {optim_key: optim}
    values = {p.name: p.value for p in checkpoint if p.value is not None}
    if values:
        state_dict[model_key] = values
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save(state_dict, storage_writer=FileSystemWriter(path), no_dist=True)
    return path
