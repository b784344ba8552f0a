"""The run config: the ModelTC/llmc YAML schema, validated strictly.

``load(path, overrides)`` reads the YAML, applies dotted overrides, expands environment variables,
validates every section (plugin sections against the plugin the section names) and checks the
rules that span sections, all before any model loads. Every problem becomes one line of an
:class:`~llmc_core.errors.LlmcError`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, create_model, field_validator

from llmc_core.checkpoint import FOLDER as CHECKPOINT_FOLDER
from llmc_core.schema import StrictModel
from llmc_core.errors import LlmcError, did_you_mean
from llmc_core.paths import hub_problem, looks_like_hub_id
from llmc_core.plugins import PluginManager, get_manager
from llmc_core.quant.scheme import Scheme, expand_preset, scheme_problems
from llmc_core.quant.spec import KvSpec, QuantSpec
from llmc_core.yamlio import PATH_KEYS, SECTIONS, apply_overrides, expand, read_yaml

__all__ = ["POSITIONS", "QUANTIZED_POSITIONS", "SECTIONS", "RunConfig", "apply_overrides", "load", "read_yaml", "validate"]

log = logging.getLogger("llmc")

POSITIONS = ("pretrain", "transformed", "fake_quant", "real_quant")
QUANTIZED_POSITIONS = ("transformed", "fake_quant", "real_quant")


# ``download``: false = the local path only; true = fetch from the hub; auto = the local path when it
# exists, the hub otherwise (docs/data.md).
def _download(value: Any) -> Any:
    if value is True or value is False or value == "auto":
        return value
    raise ValueError("should be false, true or auto")


Download = Annotated[bool | Literal["auto"], BeforeValidator(_download)]


class BaseSection(StrictModel):
    """``base``: run-wide settings."""

    seed: int = Field(default=42, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


class CalibSection(StrictModel):
    """``calib``: where calibration samples come from and how they are cut."""

    name: str
    download: Download = False
    path: str | None = None
    n_samples: int = Field(default=128, gt=0)
    bs: int = Field(default=-1, ge=-1)
    seq_len: int = Field(default=512, gt=0)
    preproc: str = "pileval_awq"
    seed: int = 42

    @field_validator("bs")
    @classmethod
    def _no_empty_batches(cls, value: int) -> int:
        if value == 0:
            raise ValueError("should be -1 (all samples in one batch) or a batch size of 1 or more")
        return value


class EvalSection(StrictModel):
    """``eval``: the fields every evaluator's config has; evaluators subclass it."""

    eval_pos: list[Literal["pretrain", "transformed", "fake_quant", "real_quant"]] = Field(default_factory=lambda: ["pretrain", "fake_quant"])
    type: str = "ppl"
    name: str
    download: Download = False
    path: str | None = None


class QuantSection(StrictModel):
    """``quant``: the method, the scheme (``weight``, ``act``, ``kvcache`` or the ``scheme``
    shorthand; raw here, validated into a :class:`~llmc_core.quant.scheme.Scheme`), and the
    method's own ``special`` options (raw here)."""

    method: str | list[str]
    weight: dict[str, Any] | None = None
    act: dict[str, Any] | None = None
    kvcache: dict[str, Any] | None = None
    scheme: str | None = None
    special: dict[str, Any] = Field(default_factory=dict)
    quant_out: bool = False

    @field_validator("method")
    @classmethod
    def _a_recipe_names_each_method_once(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("name a method, or a list of them (a recipe: transforms first, the quantizer last)")
            low = [str(v).lower() for v in value]
            if len(set(low)) != len(low):
                raise ValueError("a recipe names each method once")
        return value

    @property
    def methods(self) -> list[str]:
        """The method names in order (one for a single method)."""
        return list(self.method) if isinstance(self.method, list) else [self.method]

    @property
    def method_name(self) -> str:
        """How logs and the report name the method or recipe (``SmoothQuant+GPTQ``)."""
        return "+".join(self.methods)


@dataclass
class RunConfig:
    """The validated config: one typed object per section, plugin classes already resolved."""

    source: str
    raw: dict[str, Any]
    base: BaseSection
    model: BaseModel
    model_family: type
    calib: CalibSection | None = None
    evals: list[tuple[type, BaseModel]] = field(default_factory=list)
    quant: QuantSection | None = None
    method: type | None = None
    weight: QuantSpec | None = None  # scheme.weight (kept for plugins written before schemes)
    special: BaseModel | None = None
    save: BaseModel | None = None
    savers: list[type] = field(default_factory=list)
    steps: dict[str, tuple[type, BaseModel]] = field(default_factory=dict)  # section -> (api.Step class, options)
    resume: bool = False  # ``llmc run --resume``: the save_path of an interrupted run is expected
    scheme: Scheme | None = None  # weights, activations, KV cache

    @property
    def needs_calibration(self) -> bool:
        """Calibration data and a block pass: the method calibrates, or the scheme has static scales."""
        return self.method is not None and (self.method.needs_calibration or (self.scheme is not None and self.scheme.needs_calibration))

    def positions(self, steps: bool = False) -> set[str]:
        """Where the ``eval`` sections measure (``steps``: also where the steps run, e.g. lm_eval)."""
        found = {p for _, e in self.evals for p in e.eval_pos}
        return found | {p for step, o in self.steps.values() for p in step.positions(o)} if steps else found

    @property
    def quantizes_in_block_pass(self) -> bool:
        """``quant.quant_out`` in effect: each block is quantized right after the method's block
        pass solves it. Only methods that calibrate have a block pass (RTN has none)."""
        return self.quant is not None and self.quant.quant_out and self.needs_calibration

    @property
    def save_path(self) -> Path | None:
        return Path(self.save.save_path) if self.save is not None else None


# ---------------------------------------------------------------------------------------------
# validating
# ---------------------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def validate(self, model: type[BaseModel], data: Any, where: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.add(f"{where}: expected a mapping of keys, got {type(data).__name__} ({data!r}).")
            return None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for err in _one_per_value(exc.errors(), data):
                self.add(_render(err, model, where))
            return None


def _one_per_value(errors: list[dict[str, Any]], data: Any) -> list[dict[str, Any]]:
    """One error per value: a value that fits no member of a union (``bit: int | str`` given 4.0
    in strict mode) gets one error per member, located ``bit.int``, ``bit.str``: the parts of a
    location that name no place in ``data`` (but for a missing required key) are such member tags.
    They are dropped, and the messages joined: ``Input should be a valid integer or a valid
    string``."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for err in errors:
        node: Any = data
        loc = []
        for part in err["loc"]:
            if node is _ABSENT or (isinstance(node, dict) and part not in node and err["type"] == "missing"):
                loc.append(part)  # a required key the data lacks
                node = _ABSENT
            elif (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int) and part < len(node)):
                loc.append(part)
                node = node[part]
            # else: a union member's tag (``int``, ``str``, a model's name): not a place in the data
        key = tuple(loc)
        if key in merged and err["type"] not in ("missing", "extra_forbidden"):
            first = merged[key]
            if err["msg"] not in first["msg"]:
                first["msg"] += " or " + err["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
            continue
        merged.setdefault(key, {**err, "loc": key})
    return list(merged.values())


_ABSENT = object()  # a location past what the data holds (a missing key): every part is kept


def _render(err: dict[str, Any], model: type[BaseModel], where: str) -> str:
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    key = f"{where}.{loc}" if loc else where
    if err["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields) if len(err["loc"]) == 1 else []
        hint = did_you_mean(str(err["loc"][-1]), allowed)
        listing = f" Allowed keys: {', '.join(allowed)}." if allowed else ""
        return f"{key}: unknown key.{hint}{listing}"
    if err["type"] == "missing":
        return f"{key}: required key is missing."
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give the folder to write into (an empty path would mean the current directory)")
    return value


def _save_model(manager: PluginManager) -> type[BaseModel]:
    """The ``save`` schema: common keys plus one ``save_<name>`` flag per registered saver."""
    flags: dict[str, Any] = {f"save_{name}": (bool, False) for name in manager.names("saver")}
    return create_model(
        "SaveSection",
        __base__=StrictModel,
        save_path=(Annotated[str, AfterValidator(_not_blank)], ...),
        overwrite=(bool, False),
        checkpoint_blocks=(bool, False),
        **flags,
    )


def validate(data: dict[str, Any], source: str = "<config>", manager: PluginManager | None = None, resume: bool = False) -> RunConfig:
    """Validate a raw config mapping; raise one :class:`LlmcError` listing every problem.

    ``resume``: the run continues an interrupted one, so its save_path may already hold files.
    """
    manager = manager or get_manager()
    data = expand(data, "", (*PATH_KEYS, *manager.path_keys()))
    problems = _Problems()
    step_sections = {}
    for e in (e for e in manager.entries() if e.kind == "step"):
        if e.cls.section_name() in SECTIONS or e.cls.section_name() in step_sections:
            problems.add(f"step '{e.name}' ({e.distribution}) claims the section '{e.cls.section_name()}', which {'llmc itself' if e.cls.section_name() in SECTIONS else 'another step'} owns. Uninstall that plugin or give its step another section.")
        else:
            step_sections[e.cls.section_name()] = e.cls
    sections = (*SECTIONS, *step_sections)
    for key in data:
        if key not in sections:
            problems.add(f"{key}: unknown section.{did_you_mean(key, sections)} Sections: {', '.join(sections)}.")
    base = problems.validate(BaseSection, data.get("base"), "base") or BaseSection()

    model_raw = data.get("model")
    family = model_cfg = None
    if not isinstance(model_raw, dict) or "type" not in model_raw:
        problems.add("model: a model section with 'type' and 'path' is required (e.g. type: Llama).")
    else:
        family = _lookup(manager, problems, "model", model_raw["type"], "model.type")
        if family is not None:
            model_cfg = problems.validate(family.Config, model_raw, "model")

    calib = problems.validate(CalibSection, data["calib"], "calib") if data.get("calib") is not None else None
    if calib is not None:
        _lookup(manager, problems, "dataset", calib.name, "calib.name")
        _lookup(manager, problems, "preproc", calib.preproc, "calib.preproc")

    evals = []
    raw_evals = data.get("eval")
    raw_evals = [] if raw_evals is None else raw_evals if isinstance(raw_evals, list) else [raw_evals]
    for i, ev in enumerate(raw_evals):
        where = "eval" if not isinstance(data.get("eval"), list) else f"eval.{i}"
        kind = ev.get("type", "ppl") if isinstance(ev, dict) else "ppl"
        evaluator = _lookup(manager, problems, "evaluator", kind, f"{where}.type")
        if evaluator is None:
            continue
        cfg = problems.validate(evaluator.Config, ev, where)
        if cfg is not None:
            evals.append((evaluator, cfg))
            if getattr(evaluator, "uses_dataset", True):
                _lookup(manager, problems, "dataset", cfg.name, f"{where}.name")

    quant = problems.validate(QuantSection, data["quant"], "quant") if data.get("quant") is not None else None
    method = weight = special = scheme = None
    if quant is not None:
        many = len(quant.methods) > 1
        classes = []
        for i, n in enumerate(quant.methods):  # the first unknown name is the one line about the key
            found = _lookup(manager, problems, "method", n, f"quant.method.{i}" if many else "quant.method")
            if found is None:
                break
            classes.append(found)
        scheme = _scheme(quant, problems)
        weight = scheme.weight if scheme is not None else None
        if len(classes) == len(quant.methods) and many:
            method, special = _recipe(classes, quant, problems, manager)
        elif len(classes) == len(quant.methods):
            method = classes[0]
            special = problems.validate(method.Config, quant.special, "quant.special")

    save = problems.validate(_save_model(manager), data["save"], "save") if data.get("save") is not None else None
    savers = [manager.get("saver", n, "save") for n in manager.names("saver") if save is not None and getattr(save, f"save_{n}")]
    for saver in savers:  # e.g. GGUF's float16 scales and mins: the methods quantize on the grid the file stores
        if scheme is not None and saver.position != "transformed":
            scheme = saver.fit_scheme(scheme)
            weight = scheme.weight

    cfg = RunConfig(source, data, base, model_cfg, family, calib, evals, quant, method, weight, special, save, savers, resume=resume, scheme=scheme)
    if resume and save is None:
        problems.add("--resume needs a save section with save_path (where the checkpoint of the interrupted run is).")
    for section, step in step_sections.items():  # top-level sections owned by a step plugin
        if data.get(section) is not None:
            options = problems.validate(step.Config, data[section], section)
            if options is not None:
                cfg.steps[section] = (step, options)
    if not problems.lines:
        _cross_section_rules(cfg, problems)
    if problems.lines:
        raise LlmcError(*problems.lines)
    return cfg


def _scheme(quant: QuantSection, problems: _Problems) -> Scheme | None:
    """The section's weight / act / kvcache specs (after expanding ``quant.scheme``) as one Scheme."""
    weight_raw, act_raw = quant.weight, quant.act
    if quant.scheme is not None:
        weight_raw, act_raw, lines = expand_preset(quant.scheme, weight_raw, act_raw)
        if lines:
            problems.lines.extend(lines)
            return None
    elif weight_raw is None:
        problems.add("quant.weight: required key is missing (or name a scheme, e.g. quant.scheme: W4A16 or FP8_DYNAMIC).")
        return None
    n = len(problems.lines)
    weight = problems.validate(QuantSpec, weight_raw, "quant.weight")
    act = problems.validate(QuantSpec, act_raw, "quant.act") if act_raw is not None else None
    kv = problems.validate(KvSpec, quant.kvcache, "quant.kvcache") if quant.kvcache is not None else None
    if len(problems.lines) > n or weight is None:
        return None
    scheme = Scheme(weight, act, kv, quant.scheme.upper() if quant.scheme else None)
    lines = scheme_problems(scheme)
    problems.lines.extend(lines)
    return None if lines else scheme


def _recipe(classes: list[type], quant: QuantSection, problems: _Problems, manager: PluginManager) -> tuple[type | None, Any]:
    """``quant.method: [A, B, ...]``: the recipe class and its options (each method's ``special``
    under its name, as the registry resolves ``quant.method``'s names; defaults where absent)."""
    from llmc_core.recipe import RecipeOptions, recipe_class

    raw: dict[int, tuple[str, Any]] = {}
    listed = ", ".join(f"quant.special.{n}" for n in quant.methods)
    for key, value in quant.special.items():
        found = manager.find("method", str(key))
        i = next((i for i, c in enumerate(classes) if c is found), None)
        if i is None:
            problems.add(f"quant.special.{key}: with quant.method: [{', '.join(quant.methods)}] each method's options go under its name ({listed}); '{key}' names none of them.")
        else:
            raw[i] = (str(key), value)
    opts = []
    for i, cls in enumerate(classes):
        key, value = raw.get(i, (quant.methods[i], {}))
        opts.append(problems.validate(cls.Config, value if value is not None else {}, f"quant.special.{key}"))
    if None in opts:
        return None, None
    return recipe_class(classes), RecipeOptions(steps=tuple(opts))


def _lookup(manager: PluginManager, problems: _Problems, kind: str, name: Any, where: str) -> type | None:
    try:
        return manager.get(kind, str(name), where)
    except LlmcError as exc:
        problems.lines.extend(exc.problems)
        return None


def _cross_section_rules(cfg: RunConfig, problems: _Problems) -> None:
    needs_quant = sorted(cfg.positions() & set(QUANTIZED_POSITIONS))
    if needs_quant and cfg.quant is None:
        problems.add(f"eval.eval_pos: {', '.join(needs_quant)} needs a quant section (or remove it from eval_pos).")
    if "real_quant" in cfg.positions() and cfg.scheme is not None:
        from llmc_core.quant.rules import real_quant_problems

        problems.lines.extend(f"eval.eval_pos: real_quant: {p}. Measure fake_quant instead." for p in real_quant_problems(cfg.scheme))
    if cfg.method is not None and cfg.scheme is not None:
        problems.lines.extend(f"quant.method: {cfg.quant.method_name}: {p}" for p in cfg.method.accepts(cfg.scheme))
    if cfg.needs_calibration and cfg.calib is None:
        why = f"quant.method '{cfg.quant.method_name}' needs calibration data" if cfg.method.needs_calibration else "static activation / KV cache scales are calibrated on calibration data"
        problems.add(f"calib: {why}; add a calib section (e.g. name: pileval, path: ...).")
    if cfg.quantizes_in_block_pass and "transformed" in cfg.positions():
        problems.add("quant.quant_out: true quantizes blocks during calibration, so eval_pos 'transformed' cannot be measured; remove one of them.")
    for saver in cfg.savers:
        if saver.position != "transformed" and cfg.quant is None:
            problems.add(f"save.save_{saver.name}: needs a quant section (there is nothing quantized to save).")
        else:
            refusals = saver.accepts(cfg.scheme) if cfg.scheme is not None and saver.position != "transformed" else []
            problems.lines.extend(f"save.save_{saver.name}: {p}" for p in refusals)
            try:
                saver().check(cfg)
            except LlmcError as exc:
                problems.lines.extend(exc.problems)
    if cfg.method is not None:  # e.g. AWQ's scales.pth must not exist (unless save.overwrite)
        try:
            cfg.method.check(cfg)
        except LlmcError as exc:
            problems.lines.extend(exc.problems)
    if cfg.save is not None:
        _check_output_folder(cfg, problems)
        _check_writable(cfg.save_path, problems)
    _check_paths(cfg, problems)
    _check_device(cfg, problems)
    for step, options in cfg.steps.values():
        try:
            step().check(cfg, options)
        except LlmcError as exc:
            problems.lines.extend(exc.problems)


def _check_output_folder(cfg: RunConfig, problems: _Problems) -> None:
    from llmc_core.outlock import in_use, leftovers

    out = cfg.save_path
    if out.exists() and not out.is_dir():
        problems.add(f"save.save_path: {out} exists and is a file. Choose a folder path.")
    elif holder := in_use(out):
        problems.add(f"save.save_path: {out} is in use by {holder}. Wait for it to finish, or choose another save_path.")
    elif cfg.resume:
        pass  # the interrupted run's folder; the checkpoint in it is checked when the run starts
    elif (out / CHECKPOINT_FOLDER).is_dir() and not cfg.save.overwrite:
        problems.add(f"save.save_path: {out} holds the checkpoint of an interrupted run. Continue it with 'llmc run --resume', or set save.overwrite: true to start over.")
    elif out.exists() and set(out.iterdir()) - set(leftovers(out)) and not cfg.save.overwrite:  # a killed run's temporary files do not count
        problems.add(f"save.save_path: {out} already exists and is not empty. Choose a new path, or set save.overwrite: true to replace what llmc wrote there.")


def _check_writable(out: Path, problems: _Problems) -> None:
    """The save_path, or the folder it will be made in, must be writable: a file on the way or a
    read-only folder or file system fails here, not at the save after all the work."""
    ancestor = next(p for p in (out.absolute(), *out.absolute().parents) if os.path.lexists(p))
    if ancestor == out.absolute() and not out.is_dir():
        return  # save_path itself is a file: _check_output_folder says so
    if not ancestor.is_dir():
        problems.add(f"save.save_path: {out} is under {ancestor}, which is a file. Choose a folder path.")
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        problems.add(f"save.save_path: {out} cannot be written: {ancestor} is read-only for this user. Choose a writable folder.")


def _check_paths(cfg: RunConfig, problems: _Problems) -> None:
    for key in ("path", "tokenizer_path"):
        mpath = getattr(cfg.model, key, None)
        if not mpath or os.path.exists(mpath):
            continue
        if not looks_like_hub_id(mpath):
            problems.add(f"model.{key}: {mpath} does not exist. Give a Hugging Face model folder, a .gguf file, or pkg:<package>/<file>.")
        elif (why := hub_problem(mpath, f"model.{key}")) is not None:
            problems.add(why)
        else:
            log.warning("model.%s: %s not found locally; treating it as a Hugging Face hub id", key, mpath)
    sections: list[tuple[str, Any]] = [("calib", cfg.calib)] if cfg.calib is not None else []
    sections += [(f"eval.{i}" if len(cfg.evals) > 1 else "eval", e) for i, (ev, e) in enumerate(cfg.evals) if getattr(ev, "uses_dataset", True)]
    for where, sec in sections:
        path, download = getattr(sec, "path", None), getattr(sec, "download", False)
        local = bool(path) and Path(path).exists()
        if download is False and not path:
            problems.add(f"{where}.path: required when {where}.download is false. Give the data file or folder, or set download: auto.")
        elif download is False and not local:
            problems.add(f"{where}.path: {path} does not exist. Point it at the data (docs/data.md says where to get it), or set {where}.download: auto to fetch it from the hub when it is missing.")
        elif (download is True or not local) and download and importlib.util.find_spec("datasets") is None:
            why = "download: true" if download is True else f"{path} does not exist, so download: auto"
            problems.add(f"{where}.download: {why} fetches the data from the hub, which needs the 'datasets' package: pip install datasets (or point {where}.path at local data, docs/data.md).")


def _check_device(cfg: RunConfig, problems: _Problems) -> None:
    """``base.device: cuda[:N]`` needs that device here. Only such a config pays for importing torch."""
    device = cfg.base.device
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        problems.add(f"base.device: {device}, but no CUDA device is available here{build}. Use device: auto (CUDA when there is one) or cpu.")
    elif index >= count:
        problems.add(f"base.device: {device}, but this machine has {count} CUDA device{'s' if count > 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}). Use one of them, or device: auto.")


def load(path: str | Path, overrides: list[str] | None = None, manager: PluginManager | None = None, resume: bool = False) -> RunConfig:
    """Read, override, expand and validate the config at ``path`` (``resume``: see :func:`validate`)."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    return validate(data, str(path), manager, resume=resume)
