"""Block checkpoints: a long calibration survives a crash, Ctrl-C or SIGTERM.

With ``save.checkpoint_blocks: true`` the run keeps, under ``save_path/.checkpoints/``:

- ``block_00007.pt`` per finished block of the block-wise runner: the block's ``state_dict`` after
  the method's transform (scales and clips are folded into the weights), the integer weights the
  method produced for it (``quant.quant_out: true``), what the method object carries from block to
  block (see below), the few calibration inputs the per-layer error report uses, and the
  random-number states after the block;
- ``outputs_00007.pt``: that block's outputs, i.e. the next block's inputs (only the latest is kept);
- ``manifest.json``, written last: the config fingerprint, how many blocks are done, the evaluation
  records and the saved folders so far.

Every file is written to a temporary name, fsynced and renamed, and the manifest is the only
source of truth, so a kill at any instant leaves a checkpoint that is either the old or the new one.
``llmc run --resume cfg.yml`` loads the model again, restores the finished evaluations and blocks,
and continues with the next block; the result equals an uninterrupted run's (tests/test_resume.py).
The folder is removed when the run finishes.

A method's state across blocks (AWQ's scales and clipping ranges, its log) is kept without the
method's help, in ``method_00007.pt``: every picklable attribute of the method object except
``options`` and ``weight``, incrementally (for a dict the keys added since the previous block, for
a list the items appended since then, anything else whole). A method that rewrites dict entries or
list items of earlier blocks, or keeps unpicklable state, cannot be resumed exactly. The method
files are unpickled on resume, so they are trusted like the rest of the output folder; the block
files hold tensors only and are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmc_core.errors import LlmcError
from llmc_core.results import EvalRecord

if TYPE_CHECKING:
    import torch

    from llmc_core.blockwise import BlockContext
    from llmc_core.config import RunConfig
    from llmc_core.run import Run

FOLDER = ".checkpoints"
FORMAT = 1


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
        self._kept: dict[str, Any] = {}  # method attribute -> dict keys / list length already saved

    @classmethod
    def open(cls, config: RunConfig, resume: bool) -> Checkpoint | None:
        """The checkpoint to resume from (``resume``), a fresh one (``save.checkpoint_blocks``), or None."""
        if config.save is None:
            return None
        folder = config.save_path / FOLDER
        fp = fingerprint(config)
        if resume:
            path = folder / "manifest.json"
            if not path.is_file():
                raise LlmcError(f"--resume: there is no checkpoint in {folder}. Run without --resume (with save.checkpoint_blocks: true to make one).")
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("fingerprint") != fp or manifest.get("format") != FORMAT:
                raise LlmcError(
                    f"--resume: the checkpoint in {folder} was written by a different config. Resume with the same config and "
                    "overrides, or start over without --resume and with save.overwrite: true."
                )
            return cls(folder, manifest)
        if not getattr(config.save, "checkpoint_blocks", False):
            return None
        shutil.rmtree(folder, ignore_errors=True)  # a stale one from a run the user chose to overwrite
        folder.mkdir(parents=True)
        ckpt = cls(folder, {"format": FORMAT, "fingerprint": fp, "blocks_done": 0, "records": [], "saved": []})
        ckpt._write_manifest()
        return ckpt

    # -- evaluations and saved folders ---------------------------------------------------------

    def records(self, position: str) -> list[EvalRecord] | None:
        """The records of ``position`` if an earlier attempt finished that evaluation."""
        if position not in self.manifest.get("positions", []):
            return None
        return [EvalRecord(**r) for r in self.manifest["records"] if r["position"] == position]

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

    def save_block(self, run: Run, ctx: BlockContext) -> None:
        """Keep block ``ctx.index`` (just finished) and its outputs; then move the manifest on."""
        import numpy as np
        import torch

        prefix = ctx.prefix
        inputs, rows = run.layer_errors.block_state(prefix)
        quantized = {
            name[len(prefix) + 1 :]: {"codes": q.codes.cpu(), "scales": q.scales.cpu(), "zeros": q.zeros.cpu(), "spec": q.spec.model_dump()}
            for name, q in run.quantized.items()
            if name.startswith(f"{prefix}.")
        }
        np_state = np.random.get_state()
        state = {
            "state_dict": {k: v.detach().cpu() for k, v in ctx.block.state_dict().items()},
            "quantized": quantized,
            "layer_inputs": {k[len(prefix) + 1 :]: v for k, v in inputs.items()},
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": _listify(random.getstate()),
            "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        }
        _atomic_torch_save(state, self._block_file(ctx.index))
        _atomic_torch_save(self._method_delta(run.method), self._method_file(ctx.index))
        _atomic_torch_save([o.cpu() for o in ctx.outputs], self._outputs_file(ctx.index))
        self.manifest["blocks_done"] = ctx.index + 1
        self.manifest[f"rows_{ctx.index}"] = rows
        self._write_manifest()
        if ctx.index > 0:
            self._outputs_file(ctx.index - 1).unlink(missing_ok=True)

    def restore_blocks(self, run: Run) -> int:
        """Load every finished block into ``run.model``; return how many (the index to continue at)."""
        import numpy as np
        import torch

        from llmc_core.quant import QuantSpec, QuantizedWeight

        done = self.blocks_done
        blocks = run.adapter.blocks()
        location = None if torch.cuda.is_available() else "cpu"  # a method's state may live on the GPU
        state: dict[str, Any] = {}
        for i in range(done):
            state = torch.load(self._block_file(i), map_location="cpu", weights_only=True)
            blocks[i].load_state_dict(state["state_dict"])
            prefix = run.adapter.block_prefix(i)
            for name, q in state["quantized"].items():
                run.quantized[f"{prefix}.{name}"] = QuantizedWeight(q["codes"], q["scales"], q["zeros"], QuantSpec(**q["spec"]))
            run.layer_errors.restore_block({f"{prefix}.{k}": v for k, v in state["layer_inputs"].items()}, self.manifest.get(f"rows_{i}", []))
            self._restore_method(run.method, torch.load(self._method_file(i), map_location=location, weights_only=False))
        if done:  # random states as they were right after the last finished block
            torch.set_rng_state(state["rng_torch"])
            if state["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            random.setstate(_tuplify(state["rng_python"]))
            name, keys, *rest = state["rng_numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        self.restored_blocks = done
        return done

    def load_outputs(self, device: torch.device) -> list[torch.Tensor]:
        """The outputs of the last finished block: the inputs of the block to continue with."""
        import torch

        return [o.to(device) for o in torch.load(self._outputs_file(self.blocks_done - 1), map_location="cpu", weights_only=True)]

    def finish(self) -> None:
        """The run is complete: the checkpoint is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def describe(self) -> str:
        return f"checkpoint: {self.blocks_done} block(s) kept in {self.folder}"

    # -- the method's cross-block state --------------------------------------------------------

    def _method_delta(self, method: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in vars(method).items():
            if name in ("options", "weight"):
                continue
            if isinstance(value, dict):
                entry = ("dict", {k: v for k, v in value.items() if k not in self._kept.get(name, set())})
            elif isinstance(value, list):
                entry = ("list", value[self._kept.get(name, 0) :])
            else:
                entry = ("value", value)
            if not _picklable(entry):
                continue
            out[name] = entry
            if isinstance(value, dict):
                self._kept.setdefault(name, set()).update(value)
            elif isinstance(value, list):
                self._kept[name] = len(value)
        return out

    def _restore_method(self, method: Any, delta: dict[str, Any]) -> None:
        for name, (kind, value) in delta.items():
            current = getattr(method, name, None)
            if kind == "dict":
                current = current if isinstance(current, dict) else {}
                current.update(value)
                self._kept.setdefault(name, set()).update(value)
            elif kind == "list":
                current = current if isinstance(current, list) else []
                current.extend(value)
                self._kept[name] = len(current)
            else:
                current = value
            setattr(method, name, current)

    # -- files ---------------------------------------------------------------------------------

    def _block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.pt"

    def _method_file(self, index: int) -> Path:
        return self.folder / f"method_{index:05d}.pt"

    def _outputs_file(self, index: int) -> Path:
        return self.folder / f"outputs_{index:05d}.pt"

    def _write_manifest(self) -> None:
        path = self.folder / "manifest.json"
        _atomic_write(path, lambda fh: fh.write(json.dumps(self.manifest, indent=1).encode()))


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic_write(path, lambda fh: torch.save(obj, fh))


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, tuple) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _picklable(value: Any) -> bool:
    import pickle

    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return True
    except Exception:  # a lock, a file handle, a lambda: not state a resume can carry
        return False
