"""The plugin manager: entry points, one registry per kind, clear errors.

Discovery is lazy: nothing is loaded until :func:`get_manager` is first called. Built-in plugins
come through the ``llmc`` entry-point group like any other package; when llmc runs from a source
tree that was never installed, :data:`llmc_plugins.DEFAULT_PLUGINS` is the fallback.
``LLMC_DISABLE_PLUGIN_AUTOLOAD=1`` loads only llmc's own plugins; ``LLMC_LOAD_PLUGINS=dist1,dist2``
loads only those third-party distributions beside them. Every registration is checked at
once: a misspelled hook, a hook function without ``@hookimpl`` or a plugin that fails to import is
an :class:`~llmc_core.errors.LlmcError` naming the plugin and its distribution, never a silent skip.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from llmc_core import api, hookspecs
from llmc_core.errors import LlmcError, did_you_mean, unknown_name

GROUP = "llmc"
OWN_DISTRIBUTION = "llmc"
KINDS = {
    "model": "llmc_register_models",
    "dataset": "llmc_register_datasets",
    "preproc": "llmc_register_preprocs",
    "method": "llmc_register_methods",
    "evaluator": "llmc_register_evaluators",
    "step": "llmc_register_steps",
    "saver": "llmc_register_savers",
}
_BASES = {"model": api.ModelFamily, "dataset": api.Dataset, "preproc": api.Preproc, "method": api.Method, "evaluator": api.Evaluator, "step": api.Step, "saver": api.Saver}
# What a kind is called in error messages ("Unknown quant method 'x' at quant.method").
KIND_LABELS = {"model": "model type", "method": "quant method"}


@dataclass
class Entry:
    """One registered plugin class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str


@dataclass
class PluginManager:
    """Wraps pluggy's manager with per-kind registries keyed by lower-case name."""

    pm: pluggy.PluginManager
    sources: dict[str, str] = field(default_factory=dict)  # pluggy plugin name -> distribution
    _registries: dict[str, dict[str, Entry]] | None = None

    # -- registration -------------------------------------------------------------------------

    def register_module(self, module: Any, name: str, distribution: str) -> None:
        """Register a plugin object (usually a module) under ``name`` and check its hooks.

        Registering the same object again is a no-op; another object under a taken name, a hook
        implementation with a misspelled name or an unknown argument, and an ``llmc_*`` function
        left without ``@hookimpl`` are errors (the plugin is not kept).
        """
        if self.pm.is_registered(module):
            return
        if self.pm.has_plugin(name):
            raise LlmcError(f"Plugin name '{name}' is already registered (from {self.sources.get(name, 'unknown')}); register {distribution}'s plugin under another name, or unregister the first.")
        unmarked = [n for n in dir(module) if n.startswith("llmc_") and callable(getattr(module, n, None)) and self.pm.parse_hookimpl_opts(module, n) is None]
        if unmarked:
            raise LlmcError(f"Plugin '{name}' ({distribution}) defines {', '.join(unmarked)} without @hookimpl, so llmc would never call it. Decorate it: from llmc_core import hookimpl.")
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise LlmcError(f"Plugin '{name}' ({distribution}) has an invalid hook implementation: {exc}. Compare it with llmc_core.hookspecs.") from exc
        self.sources[name] = distribution
        self._registries = None
        try:
            self.check_pending()
        except LlmcError:
            self.unregister(name)
            raise

    def check_pending(self) -> None:
        """Fail loudly on a hook implementation whose name matches no hook spec (a misspelling)."""
        for hook_name, caller in vars(self.pm.hook).items():
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    dist = self.sources.get(impl.plugin_name, "unknown")
                    raise LlmcError(
                        f"Plugin '{impl.plugin_name}' ({dist}) implements an unknown hook '{hook_name}'."
                        f"{did_you_mean(hook_name, hookspecs.all_hook_names())} Hook names are listed in llmc_core.hookspecs (docs/plugins/hooks.md)."
                    )

    def unregister(self, name: str) -> None:
        """Remove a plugin by name (tests register plugins in-process and clean up this way)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.sources.pop(name, None)
        self._registries = None

    # -- registries ---------------------------------------------------------------------------

    def registries(self) -> dict[str, dict[str, Entry]]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def _collect(self) -> dict[str, dict[str, Entry]]:
        regs: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                distribution = self.sources.get(impl.plugin_name, "unknown")

                def register(cls: type, _kind=kind, _impl=impl, _dist=distribution) -> None:
                    self._add(regs[_kind], _kind, cls, _impl.plugin_name, _dist)

                try:  # pluggy lets an implementation take fewer arguments than its spec
                    impl.function(*[{"register": register}[arg] for arg in impl.argnames])
                except LlmcError:
                    raise
                except Exception as exc:
                    raise LlmcError(f"Plugin '{impl.plugin_name}' ({distribution}) failed in {hook_name}: {type(exc).__name__}: {exc}.") from exc
        return regs

    @staticmethod
    def _add(reg: dict[str, Entry], kind: str, cls: type, plugin: str, distribution: str) -> None:
        base = _BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise LlmcError(f"Plugin '{plugin}' ({distribution}) registered {cls!r} as a {kind}, but it is not a subclass of {base.__module__}.{base.__qualname__}.")
        name = getattr(cls, "name", "")
        if not name:
            raise LlmcError(f"Plugin '{plugin}' ({distribution}) registered a {kind} class {cls.__qualname__} without a 'name'.")
        for key in (name, *getattr(cls, "aliases", ())):
            key = key.lower()
            if key in reg and reg[key].cls is not cls:
                other = reg[key]
                raise LlmcError(
                    f"{kind} '{key}' registered by both {other.plugin} ({other.distribution}) and {plugin} "
                    f"({distribution}). Uninstall one of them."
                )
            reg[key] = Entry(kind, name.lower(), cls, plugin, distribution)

    def names(self, kind: str) -> list[str]:
        """Primary names (aliases excluded) registered for ``kind``."""
        return sorted({e.name for e in self.registries()[kind].values()})

    def find(self, kind: str, name: str) -> type | None:
        """The class registered as ``name`` (or one of its aliases, case-insensitively) for
        ``kind``, or None."""
        entry = self.registries()[kind].get(str(name).lower())
        return None if entry is None else entry.cls

    def get(self, kind: str, name: str, where: str) -> type:
        """The class registered as ``name`` for ``kind``, or a clear error naming ``where``."""
        found = self.find(kind, name)
        if found is None:
            raise unknown_name(KIND_LABELS.get(kind, kind), name, where, self.names(kind))
        return found

    def path_keys(self) -> tuple[str, ...]:
        """Every registered plugin's ``path_keys``: config keys whose values are file paths."""
        return tuple(sorted({k for e in self.entries() for k in getattr(e.cls, "path_keys", ())}))

    def entries(self) -> list[Entry]:
        """Every registered class once (aliases collapsed), ordered by kind and name."""
        seen: dict[tuple[str, str], Entry] = {}
        for kind in KINDS:
            for e in self.registries()[kind].values():
                seen.setdefault((kind, e.name), e)
        return [seen[k] for k in sorted(seen, key=lambda k: (list(KINDS).index(k[0]), k[1]))]

    def hook(self) -> Any:
        return self.pm.hook


def _autoload_disabled() -> bool:
    return os.environ.get("LLMC_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false", "no")


def _allowlist() -> set[str] | None:
    """``LLMC_LOAD_PLUGINS=dist1,dist2``: the only third-party distributions to load (set but
    empty: none); None when unset. Names compare as pip does (case, ``-`` and ``_`` alike)."""
    value = os.environ.get("LLMC_LOAD_PLUGINS")
    if value is None:
        return None
    return {_canonical(name) for name in value.split(",") if name.strip()}


def _canonical(dist: str) -> str:
    return dist.strip().lower().replace("_", "-").replace(".", "-")


def _load_entry_points(manager: PluginManager) -> bool:
    """Load the ``llmc`` entry points; return whether llmc's own distribution provided any."""
    own_found = False
    allow, offered = _allowlist(), set()
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        is_own = dist.lower() == OWN_DISTRIBUTION
        offered.add(_canonical(dist))
        if not is_own and (_autoload_disabled() or (allow is not None and _canonical(dist) not in allow)):
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin is reported by name, never skipped
            raise LlmcError(
                f"Plugin '{ep.name}' from distribution '{dist}' failed to import: {type(exc).__name__}: {exc}. "
                f"Fix or uninstall it (pip uninstall {dist}), or set LLMC_DISABLE_PLUGIN_AUTOLOAD=1."
            ) from exc
        manager.register_module(module, name=f"{dist}:{ep.name}", distribution=dist)
        own_found = own_found or is_own
    absent = sorted((allow or set()) - offered)
    if absent and not _autoload_disabled():  # a typo in the allowlist must not pass as "loaded nothing"
        others = sorted(offered - {OWN_DISTRIBUTION}) or ["none"]
        raise LlmcError(f"LLMC_LOAD_PLUGINS names {', '.join(absent)}, which no installed distribution provides as an llmc plugin (installed: {', '.join(others)}). Fix the name or pip install it.")
    return own_found


def _load_defaults(manager: PluginManager) -> None:
    from llmc_plugins import DEFAULT_PLUGINS

    for dotted in DEFAULT_PLUGINS:
        manager.register_module(importlib.import_module(dotted), name=f"{OWN_DISTRIBUTION}:{dotted}", distribution=OWN_DISTRIBUTION)


def new_manager(load_entry_points: bool = True) -> PluginManager:
    """Build a manager with the hook specs added and (by default) every plugin loaded."""
    pm = pluggy.PluginManager("llmc")
    pm.add_hookspecs(hookspecs)
    manager = PluginManager(pm)
    if load_entry_points:
        if not _load_entry_points(manager):
            _load_defaults(manager)
    return manager


_MANAGER: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide manager, created on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = new_manager()
    return _MANAGER


def reset_manager() -> None:
    """Forget the process-wide manager (tests use this after changing the environment)."""
    global _MANAGER
    _MANAGER = None
