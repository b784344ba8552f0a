"""Reading a config file, before any validation: the YAML itself (syntax errors with line and
column), dotted ``key=value`` overrides, and ``${VAR:-default}`` / ``pkg:`` expansion of the path
keys. :mod:`llmc_core.config` validates what these return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmc_core.errors import ConfigSyntaxError, LlmcError
from llmc_core.paths import expand_vars, resolve_package_path

SECTIONS = ("base", "model", "calib", "eval", "quant", "save")  # and one per registered step (api.Step)
# The core sections' path keys; a plugin names its own in ``Plugin.path_keys`` (e.g. AWQ's scale_path).
PATH_KEYS = ("path", "tokenizer_path", "save_path")


# A config has hundreds of values; aliases that expand past this are a "billion laughs" file, refused
# before anything walks the expanded tree (8 levels of a 400-byte bomb took 68 s and 1.2 GB).
MAX_VALUES = 100_000


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a config must not be: its message carries its own advice."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (naming both lines) and integers too long for
    Python to read (a ``ValueError`` with no line otherwise)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # ``<<: *base`` then a key of its own is an override, not a duplicate
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get((type(key), key))
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if first is not None:
                    lines = f"twice on line {line}" if first == line else f"lines {first} and {line}"
                    raise _Refused(problem=f"duplicate key '{key}' ({lines}); a key may appear once per section, remove one", problem_mark=key_node.start_mark)
                seen[(type(key), key)] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):  # type: ignore[no-untyped-def]
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            raise _Refused(problem=f"an integer of {digits} digits is longer than llmc reads; shorten it", problem_mark=node.start_mark) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text`` with :class:`_ConfigLoader`'s refusals."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmcError(f"Config file not found: {p}. Pass the path of a YAML config (see configs/).")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise LlmcError(f"{p}: cannot be read ({exc.strerror or exc}).") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlmcError(f"{p}: is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the config as UTF-8.") from None
    try:
        data = parse_yaml(text)
    except _Refused as exc:
        raise ConfigSyntaxError(f"{p}:{exc.problem_mark.line + 1}:{exc.problem_mark.column + 1}: {exc.problem}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigSyntaxError(f"{where}: {problem}. Fix the YAML (indentation, a missing ':' or quote).") from exc
    except RecursionError:
        raise ConfigSyntaxError(f"{p}: nested too deeply to read; a config is a few levels deep.") from None
    check_size(data, str(p))
    if not isinstance(data, dict):
        raise LlmcError(f"{p}: the config must be a mapping of sections ({', '.join(SECTIONS)}, ...), got {type(data).__name__}.")
    return data


def check_size(data: Any, where: str) -> None:
    """Refuse ``data`` when its aliases expand to more than :data:`MAX_VALUES` values or refer to
    themselves; counted over shared objects once each, so this takes as long as the file is big."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise LlmcError(f"{where}: an alias refers to a section that contains it (a loop); write the values out instead.")
        open_.add(id(node))
        total = 1 + sum(size(child) for child in (node.values() if isinstance(node, dict) else node))
        open_.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_VALUES:
            raise LlmcError(f"{where}: its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?); a config has hundreds. Write the values out instead.")
        return total

    try:
        size(data)
    except RecursionError:
        raise LlmcError(f"{where}: nested too deeply to read; a config is a few levels deep.") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlmcError(f"Override '{item}' is not of the form section.key=value (e.g. eval.num_samples=3).")
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                if node.get(part) is None:
                    node[part] = {}  # an empty section (``base:``) is one to fill
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise LlmcError(f"Override '{item}': {'.'.join(parts[: i + 1])} is not a section.")
        try:
            parsed = parse_yaml(value) if value else ""
        except _Refused as exc:
            raise LlmcError(f"Override '{item}': {exc.problem}.") from None
        except (yaml.YAMLError, RecursionError):
            parsed = value
        check_size(parsed, f"Override '{item}'")
        if isinstance(node, list):
            where = ".".join(parts[:-1])
            for i, section in enumerate(node):
                if not isinstance(section, dict):
                    raise LlmcError(f"Override '{item}': {where}.{i} is not a section (got {type(section).__name__} {section!r}), so {parts[-1]} cannot be set on each item.")
            for section in node:  # eval.x=... on a list of eval sections sets it on each
                section[parts[-1]] = parsed
        else:
            node[parts[-1]] = parsed


def expand(node: Any, where: str, path_keys: tuple[str, ...] = PATH_KEYS) -> Any:
    """``${VAR:-default}`` in every string; ``pkg:`` and ``~`` in the values of ``path_keys``."""
    if isinstance(node, dict):
        return {k: expand(v, f"{where}.{k}" if where else str(k), path_keys) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, f"{where}.{i}", path_keys) for i, v in enumerate(node)]
    if isinstance(node, str):
        value = expand_vars(node, where)
        if where.rsplit(".", 1)[-1] in path_keys:
            value = str(Path(resolve_package_path(value, where)).expanduser()) if value else value
        return value
    return node
