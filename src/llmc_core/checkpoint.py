"""Block checkpoints: a long calibration survives a crash, Ctrl-C or SIGTERM.

With ``save.checkpoint_blocks: true`` the run keeps, under ``save_path/.checkpoints/``:

- ``block_00007.pt`` per finished block of the block-wise runner: the block's ``state_dict`` after
  the method's transform (scales and clips are folded into the weights), the integer weights the
  method produced for it (``quant.quant_out: true``), the few calibration inputs the per-layer
  error report uses, and the random-number states after the block (tensors, numbers and strings
  only: read back with ``torch.load(weights_only=True)``);
- ``method_00007.safetensors``: what the method carries from block to block, as its
  :meth:`~llmc_core.api.Method.state_dict` declares it, and its ``log`` (tensors in safetensors,
  the rest as JSON; see :mod:`llmc_core.statefile`); only the latest is kept;
- ``outputs_00007.pt``: that block's outputs, i.e. the next block's inputs (only the latest is kept);
- ``manifest.json``, written last: the config fingerprint, the fingerprint of the model and data
  files the run read (:mod:`llmc_core.fingerprint`), how many blocks are done, the evaluation
  records and the saved folders so far.

Every file is written with :func:`llmc_core.fsutil.atomic_file`, and the manifest is the only
source of truth, so a kill at any instant leaves a checkpoint that is either the old or the new one.
``llmc run --resume cfg.yml`` loads the model again, restores the finished evaluations and blocks,
and continues with the next block; the result equals an uninterrupted run's (tests/test_resume.py).
The folder is removed when the run finishes.

Nothing in the folder can run code: no file is unpickled. A file that is damaged, truncated or
replaced, a manifest entry of the wrong shape, a symbolic link where a checkpoint file or the
folder should be, or a model or data file that changed since the checkpoint was made, stops
``--resume`` with one line naming it. A method that keeps attributes besides
``options``, ``weight`` and ``log`` without overriding ``state_dict`` cannot be resumed exactly;
the checkpoint notes that, and ``--resume`` refuses instead of continuing with lost state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmc_core.errors import LlmcError
from llmc_core.fsutil import atomic_file
from llmc_core.results import EvalRecord
from llmc_core.statefile import read_state, write_state

if TYPE_CHECKING:
    import torch

    from llmc_core.blockwise import BlockContext
    from llmc_core.config import RunConfig
    from llmc_core.state import RunState

FOLDER = ".checkpoints"
FORMAT = 3  # 3: the manifest records the input files (format 2 did not)
POSITIONS = ("pretrain", "transformed", "fake_quant", "real_quant")  # config.POSITIONS (config imports this module)
BASE_ATTRIBUTES = ("options", "weight", "log", "scheme")  # what every Method has (api.Method.__init__; scheme set by the runner)


def fingerprint(config: RunConfig) -> str:
    """What must not change between a run and its resumption: the whole expanded config except
    ``save.overwrite``."""
    raw = json.loads(json.dumps(config.raw, default=str))
    (raw.get("save") or {}).pop("overwrite", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


class Checkpoint:
    """The checkpoint folder of one run; see the module docstring for its layout."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest
        self.restored_blocks = 0  # blocks taken from the checkpoint by this process

    @classmethod
    def open(cls, config: RunConfig, resume: bool) -> Checkpoint | NoCheckpoint:
        """The checkpoint to resume from (``resume``), a fresh one (``save.checkpoint_blocks``), or
        a :class:`NoCheckpoint` that keeps nothing."""
        if config.save is None:
            return NoCheckpoint()
        from llmc_core.fingerprint import changes, input_fingerprints

        folder = config.save_path / FOLDER
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            what = "a symbolic link" if folder.is_symlink() else "not a folder"
            raise LlmcError(f"save.save_path: {folder} is {what}; llmc keeps its checkpoint in a folder of its own and never follows a link there. Remove it.")
        fp = fingerprint(config)
        if resume:
            path = folder / "manifest.json"
            if not path.is_file():
                raise LlmcError(f"--resume: there is no checkpoint in {folder}. Run without --resume (with save.checkpoint_blocks: true to make one).")
            manifest = _read_manifest(path)
            if manifest.get("format") != FORMAT:
                raise LlmcError(f"--resume: the checkpoint in {folder} was written by another llmc version (format {manifest.get('format')!r}, this one reads {FORMAT}). Start over without --resume and with save.overwrite: true.")
            if manifest.get("fingerprint") != fp:
                raise LlmcError(
                    f"--resume: the checkpoint in {folder} was written by a different config. Resume with the same config and "
                    "overrides, or start over without --resume and with save.overwrite: true."
                )
            changed = changes(manifest["inputs"], input_fingerprints(config))
            if changed:
                raise LlmcError(
                    f"--resume: the inputs changed since the checkpoint in {folder} was made ({'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''}), "
                    "so its blocks would mix two models or two calibration sets. Put the original files back, or start over without --resume and with save.overwrite: true."
                )
            if manifest.get("method_undeclared"):
                raise LlmcError(
                    f"--resume: the method kept {', '.join(manifest['method_undeclared'])} between blocks without declaring them in "
                    "state_dict(), so a resume would continue without them. Start over without --resume and with save.overwrite: true "
                    "(method authors: implement state_dict/load_state_dict, see docs/plugins/tutorial.md)."
                )
            return cls(folder, manifest)
        if not getattr(config.save, "checkpoint_blocks", False):
            return NoCheckpoint()
        shutil.rmtree(folder, ignore_errors=True)  # a stale one from a run the user chose to overwrite
        folder.mkdir(parents=True)
        ckpt = cls(folder, {"format": FORMAT, "fingerprint": fp, "inputs": input_fingerprints(config), "blocks_done": 0, "records": [], "saved": []})
        ckpt._write_manifest()
        return ckpt

    # -- evaluations and saved folders ---------------------------------------------------------

    def records(self, position: str) -> list[EvalRecord] | None:
        """The records of ``position`` if an earlier attempt finished that evaluation."""
        if position not in self.manifest.get("positions", []):
            return None
        return [EvalRecord(**r) for r in self.manifest["records"] if r["position"] == position]  # shapes checked by _read_manifest

    def add_records(self, position: str, records: list[EvalRecord]) -> None:
        self.manifest["records"] += [asdict(r) for r in records]
        self.manifest.setdefault("positions", []).append(position)
        self._write_manifest()

    def is_saved(self, saver: str, target: Path) -> bool:
        return saver in self.manifest["saved"] and target.is_dir()

    def mark_saved(self, saver: str) -> None:
        self.manifest["saved"].append(saver)
        self._write_manifest()

    # -- blocks --------------------------------------------------------------------------------

    @property
    def blocks_done(self) -> int:
        return self.manifest["blocks_done"]

    def save_block(self, state: RunState, ctx: BlockContext) -> None:
        """Keep block ``ctx.index`` (just finished) and its outputs; then move the manifest on."""
        import numpy as np
        import torch

        prefix = ctx.prefix
        inputs, rows = state.layer_errors.block_state(prefix)
        quantized = {
            name[len(prefix) + 1 :]: {"codes": q.codes.cpu(), "scales": q.scales.cpu(), "zeros": q.zeros.cpu(), "spec": q.spec.model_dump(), **({} if q.g_idx is None else {"g_idx": q.g_idx.cpu()}), **({} if q.global_scale is None else {"global_scale": q.global_scale.cpu()})}
            for name, q in state.quantized.items()
            if name.startswith(f"{prefix}.")
        }
        np_state = np.random.get_state()
        kept = {
            "state_dict": {k: v.detach().cpu() for k, v in ctx.block.state_dict().items()},
            "quantized": quantized,
            "observed": state.observer.block_state(prefix) if getattr(state, "observer", None) is not None else {},
            "layer_inputs": {k[len(prefix) + 1 :]: v for k, v in inputs.items()},
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": _listify(random.getstate()),
            "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        }
        _atomic_torch_save(kept, self._block_file(ctx.index))
        method = state.method
        write_state(self._method_file(ctx.index), {"log": method.log, "state": method.state_dict()}, f"{type(method).__name__}.state_dict()")
        _atomic_torch_save([o.cpu() for o in ctx.outputs], self._outputs_file(ctx.index))
        self.manifest["blocks_done"] = ctx.index + 1
        self.manifest[f"rows_{ctx.index}"] = rows
        self.manifest["method_undeclared"] = undeclared_state(method)
        self._write_manifest()
        if ctx.index > 0:
            self._outputs_file(ctx.index - 1).unlink(missing_ok=True)
            self._method_file(ctx.index - 1).unlink(missing_ok=True)

    def restore_blocks(self, state: RunState) -> int:
        """Load every finished block into ``state.model``; return how many (the index to continue at)."""
        import numpy as np
        import torch

        from llmc_core.quant import QuantSpec, QuantizedWeight

        done = self.blocks_done
        blocks = state.adapter.blocks()
        if done > len(blocks):
            raise LlmcError(f"--resume: the checkpoint in {self.folder} has {done} blocks, the model {len(blocks)}. Start over without --resume and with save.overwrite: true.")
        kept_block: dict[str, Any] = {}
        for i in range(done):
            path = self._block_file(i)
            with _reading(path):
                kept_block = torch.load(path, map_location="cpu", weights_only=True)
                blocks[i].load_state_dict(kept_block["state_dict"])
                prefix = state.adapter.block_prefix(i)
                for name, q in kept_block["quantized"].items():
                    state.quantized[f"{prefix}.{name}"] = QuantizedWeight(q["codes"], q["scales"], q["zeros"], QuantSpec(**q["spec"]), q.get("g_idx"), q.get("global_scale"))
                if kept_block.get("observed"):
                    if getattr(state, "observer", None) is None:
                        raise LlmcError(f"--resume: {path} holds calibrated activation scales, but this run's scheme has none (was quant changed?). Start over without --resume and with save.overwrite: true.")
                    state.observer.restore_block(kept_block["observed"])
                state.layer_errors.restore_block({f"{prefix}.{k}": v for k, v in kept_block["layer_inputs"].items()}, self.manifest.get(f"rows_{i}", []))
        if done:
            path = self._method_file(done - 1)
            with _reading(path):
                kept = read_state(path)
                state.method.log[:] = kept["log"]
                state.method.load_state_dict(kept["state"])
            with _reading(self._block_file(done - 1)):  # random states as they were right after the last finished block
                torch.set_rng_state(kept_block["rng_torch"])
                if kept_block["rng_cuda"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(kept_block["rng_cuda"])
                random.setstate(_tuplify(kept_block["rng_python"]))
                name, keys, *rest = kept_block["rng_numpy"]
                np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        self.restored_blocks = done
        return done

    def load_outputs(self, device: torch.device) -> list[torch.Tensor]:
        """The outputs of the last finished block: the inputs of the block to continue with."""
        import torch

        path = self._outputs_file(self.blocks_done - 1)
        with _reading(path):
            outputs = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(outputs, list) and all(isinstance(o, torch.Tensor) for o in outputs)):
                raise TypeError("not a list of tensors")
        return [o.to(device) for o in outputs]

    def finish(self) -> None:
        """The run is complete: the checkpoint is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def describe(self) -> str:
        return f"checkpoint: {self.blocks_done} block(s) kept in {self.folder}"

    # -- files ---------------------------------------------------------------------------------

    def _block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.pt"

    def _method_file(self, index: int) -> Path:
        return self.folder / f"method_{index:05d}.safetensors"

    def _outputs_file(self, index: int) -> Path:
        return self.folder / f"outputs_{index:05d}.pt"

    def _write_manifest(self) -> None:
        path = self.folder / "manifest.json"
        _atomic_write(path, lambda fh: fh.write(json.dumps(self.manifest, indent=1).encode()))


class NoCheckpoint:
    """The checkpoint of a run that keeps none (no ``save.checkpoint_blocks``, or no ``save``
    section): :class:`Checkpoint`'s interface, doing nothing, so the run has no ``None`` branches."""

    folder = None
    restored_blocks = 0
    blocks_done = 0

    def records(self, position: str) -> list[EvalRecord] | None:
        return None

    def add_records(self, position: str, records: list[EvalRecord]) -> None:
        pass

    def is_saved(self, saver: str, target: Path) -> bool:
        return False

    def mark_saved(self, saver: str) -> None:
        pass

    def save_block(self, state: RunState, ctx: BlockContext) -> None:
        pass

    def restore_blocks(self, state: RunState) -> int:
        return 0

    def load_outputs(self, device: torch.device) -> list[torch.Tensor]:
        raise LlmcError("--resume: there is no checkpoint to continue from.")  # restore_blocks returned 0: never reached

    def finish(self) -> None:
        pass

    def describe(self) -> str:
        return "no checkpoint"


def _atomic_write(path: Path, write: Any) -> None:
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic_write(path, lambda fh: torch.save(obj, fh))


def undeclared_state(method: Any) -> list[str]:
    """Attributes ``method`` keeps that its (inherited, empty) ``state_dict`` does not declare."""
    from llmc_core.api import Method

    if type(method).state_dict is not Method.state_dict:
        return []  # the author declared the state: trust the declaration
    return sorted(k for k in vars(method) if k not in BASE_ATTRIBUTES)


def _damaged(path: Path, why: str) -> LlmcError:
    return LlmcError(
        f"--resume: the checkpoint file {path} is damaged or was not written by llmc ({why}); nothing was read from it. "
        "Start over without --resume and with save.overwrite: true."
    )


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Any failure while reading ``path`` and using what it holds means the file is not the one
    llmc wrote (torch.load with weights_only refuses pickled code; truncation, wrong shapes)."""
    try:
        if path.is_symlink():
            raise ValueError("a symbolic link")
        yield
    except LlmcError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise _damaged(path, f"{type(exc).__name__}: {first}" if first else type(exc).__name__) from exc


def _read_manifest(path: Path) -> dict[str, Any]:
    with _reading(path):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        _check_manifest(manifest)
    return manifest


def _check_manifest(manifest: Any) -> None:
    """Every entry of the manifest has the shape llmc writes, or the checkpoint is not llmc's
    (fail closed: a record of the wrong shape would drop a result, or stop the run at its end)."""
    if not isinstance(manifest, dict):
        raise TypeError("not a JSON object")
    if manifest.get("format") != FORMAT:
        return  # refused by Checkpoint.open, naming the version
    required = {"fingerprint": str, "inputs": dict, "blocks_done": int, "records": list, "saved": list}
    optional = {"positions": list, "method_undeclared": list}
    for key, kind in {**required, **optional}.items():
        if key not in manifest:
            if key in required:
                raise KeyError(key)
        elif not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise TypeError(f"'{key}' is not a {kind.__name__}")
    done = manifest["blocks_done"]
    if done < 0:
        raise ValueError("negative blocks_done")
    rows = {f"rows_{i}" for i in range(done)}
    unknown = sorted(set(manifest) - set(required) - set(optional) - {"format"} - rows)
    if unknown:
        raise ValueError(f"unknown entries {', '.join(unknown)}")
    for key in rows & set(manifest):
        if not (isinstance(manifest[key], list) and all(_is_layer_row(r) for r in manifest[key])):
            raise TypeError(f"'{key}' is not a list of per-layer error rows")
    for key in ("saved", "positions", "method_undeclared"):
        if not all(isinstance(v, str) for v in manifest.get(key, [])):
            raise TypeError(f"'{key}' holds something other than names")
    positions = manifest.get("positions", [])
    if not set(positions) <= set(POSITIONS) or len(set(positions)) != len(positions):
        raise ValueError("'positions' names an unknown or repeated position")
    for r in manifest["records"]:
        _check_record(r, positions)
    for key, value in manifest["inputs"].items():
        if not (isinstance(value, dict) and value.get("kind") in ("file", "folder", "absent") and isinstance(value.get("files"), dict)):
            raise TypeError(f"input '{key}' is not a file fingerprint")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_layer_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and set(row) == {"layer", "block", "name", "weight_rel_mse", "output_rel_mse"}
        and isinstance(row["layer"], str)
        and isinstance(row["name"], str)
        and isinstance(row["block"], int)
        and not isinstance(row["block"], bool)
        and _is_number(row["weight_rel_mse"])
        and _is_number(row["output_rel_mse"])
    )


def _check_record(r: Any, positions: list[str]) -> None:
    if not isinstance(r, dict):
        raise TypeError("a record is not a JSON object")
    EvalRecord(**r)  # the field names
    if r["position"] not in positions:
        raise ValueError(f"a record's position {r['position']!r} is not one of the finished positions")
    for key in ("evaluator", "dataset", "metric"):
        if not isinstance(r[key], str):
            raise TypeError(f"a record's '{key}' is not a string")
    for key in ("value", "seconds"):
        if not _is_number(r[key]):
            raise TypeError(f"a record's '{key}' is not a number")
    if r.get("stderr") is not None and not _is_number(r["stderr"]):
        raise TypeError("a record's 'stderr' is not a number")


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, tuple) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
