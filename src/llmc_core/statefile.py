"""State files without pickle: tensors in safetensors, everything else as JSON in its header.

A state is a tree of dicts (string keys), lists, tuples (read back as lists), strings, numbers,
booleans, None and tensors. :func:`write_state` stores each tensor as a safetensors entry and the
tree, with each tensor replaced by ``{"$tensor": key}``, as JSON in the file's metadata; reading it
back runs no code from the file, whatever the file holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TENSOR = "$tensor"
META_KEY = "llmc_state"


class StateError(ValueError):
    """The file is not a state file llmc wrote (damaged, truncated or replaced)."""


def encode(value: Any, tensors: dict[str, Any], where: str = "state") -> Any:
    """The JSON tree of ``value``; its tensors go into ``tensors``. ``where`` names the place of an
    unsupported value in the error."""
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # own contiguous CPU copies: safetensors refuses tensors that share memory
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: key}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be strings, got {k!r}")
            if k == TENSOR:
                raise TypeError(f"{where}: the key {TENSOR!r} is reserved")
            out[k] = encode(v, tensors, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not a tensor or a JSON value; a method's state_dict() may hold only those")


def decode(tree: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors[tree[TENSOR]]
        return {k: decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    return tree


def write_state(path: Path, state: Any, where: str = "state") -> None:
    """Write ``state`` to ``path`` atomically (replacing it)."""
    from safetensors.torch import save_file

    from llmc_core.fsutil import atomic_file

    tensors: dict[str, Any] = {}
    tree = encode(state, tensors, where)
    with atomic_file(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(tree)})


def read_state(path: Path) -> Any:
    """The state in ``path``; :class:`StateError` if it is not one llmc wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return decode(json.loads(meta[META_KEY]), tensors)
    except Exception as exc:  # safetensors raises its own error types; all mean "not ours"
        raise StateError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip(": ")) from exc
