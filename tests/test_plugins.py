"""Plugin discovery and registration: entry points from fake distributions, in-process plugins,
and the ``llmc plugins`` listing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmc_core import hookimpl, plugins
from llmc_core.api import Dataset, Method
from llmc_core.errors import LlmcError
from llmc_core.testing import registered, run_cli

ROOT = Path(__file__).resolve().parents[1]


# -- fake distributions ----------------------------------------------------------------------------


@dataclass
class FakeEntryPoint:
    """What ``_load_entry_points`` reads of an ``importlib.metadata.EntryPoint``."""

    name: str
    dist_name: str
    target: Any  # a module, or an exception to raise on load

    @property
    def dist(self) -> Any:
        return types.SimpleNamespace(name=self.dist_name)

    def load(self) -> Any:
        if isinstance(self.target, BaseException):
            raise self.target
        return self.target


@pytest.fixture
def installed(monkeypatch, fresh_plugins):
    """Replace the installed ``llmc`` entry points by fake ones; returns a function to set them."""
    eps: list[FakeEntryPoint] = []

    def entry_points(group: str | None = None, **_: Any) -> list[FakeEntryPoint]:
        assert group == plugins.GROUP
        return list(eps)

    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv("LLMC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LLMC_LOAD_PLUGINS", raising=False)

    def install(*new: FakeEntryPoint) -> list[FakeEntryPoint]:
        eps.extend(new)
        return eps

    return install


def method_class(name: str, doc: str = "A test method.") -> type[Method]:
    return type(f"M_{name}", (Method,), {"name": name, "needs_calibration": False, "__doc__": doc})


def plugin_module(modname: str, *classes: type, hook: str = "llmc_register_methods") -> types.ModuleType:
    """A module with one ``@hookimpl`` registration function registering ``classes``."""
    mod = types.ModuleType(modname)

    def register_all(register):
        for cls in classes:
            register(cls)

    register_all.__name__ = hook
    setattr(mod, hook, hookimpl(register_all))
    return mod


# -- discovery ------------------------------------------------------------------------------------


def test_good_plugin_is_found_next_to_the_builtins(installed):
    cls = method_class("fancy")
    installed(FakeEntryPoint("fancy", "llmc-fancy", plugin_module("llmc_fancy", cls)))
    manager = plugins.new_manager()
    assert manager.get("method", "FANCY", "quant.method") is cls
    entry = next(e for e in manager.entries() if e.name == "fancy")
    assert (entry.kind, entry.plugin, entry.distribution) == ("method", "llmc-fancy:fancy", "llmc-fancy")
    # llmc itself provided no entry point here, so the built-ins came from DEFAULT_PLUGINS.
    assert "rtn" in manager.names("method") and "ppl" in manager.names("evaluator")


def test_own_entry_points_replace_the_default_list(installed):
    import llmc_plugins.methods.rtn as rtn

    installed(FakeEntryPoint("rtn", "llmc", rtn))
    manager = plugins.new_manager()
    assert manager.names("method") == ["rtn"]
    assert manager.names("evaluator") == []  # DEFAULT_PLUGINS was not used


def test_duplicate_name_names_both_providers(installed):
    installed(
        FakeEntryPoint("one", "dist-a", plugin_module("mod_a", method_class("twin"))),
        FakeEntryPoint("two", "dist-b", plugin_module("mod_b", method_class("twin"))),
    )
    manager = plugins.new_manager()
    with pytest.raises(LlmcError) as exc:
        manager.names("method")
    msg = str(exc.value)
    assert "method 'twin' registered by both dist-a:one (dist-a) and dist-b:two (dist-b)" in msg
    assert "Uninstall one of them" in msg


def test_third_party_cannot_take_a_builtin_name(installed):
    installed(FakeEntryPoint("rtn2", "llmc-evil", plugin_module("evil", method_class("RTN"))))
    with pytest.raises(LlmcError) as exc:
        plugins.new_manager().registries()
    msg = str(exc.value)
    assert msg.startswith("method 'rtn' registered by both ")
    assert "llmc:llmc_plugins.methods.rtn (llmc)" in msg and "llmc-evil:rtn2 (llmc-evil)" in msg


def test_import_error_names_plugin_and_distribution(installed):
    installed(FakeEntryPoint("broken", "llmc-broken", ImportError("No module named 'numpyy'")))
    with pytest.raises(LlmcError) as exc:
        plugins.new_manager()
    msg = str(exc.value)
    assert "Plugin 'broken' from distribution 'llmc-broken' failed to import: ImportError: No module named 'numpyy'" in msg
    assert "pip uninstall llmc-broken" in msg and "LLMC_DISABLE_PLUGIN_AUTOLOAD=1" in msg


def test_cli_reports_a_broken_plugin_in_one_line(installed):
    installed(FakeEntryPoint("broken", "llmc-broken", RuntimeError("boom")))
    result = run_cli("plugins")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "llmc: Plugin 'broken' from distribution 'llmc-broken' failed to import: RuntimeError: boom. "
        "Fix or uninstall it (pip uninstall llmc-broken), or set LLMC_DISABLE_PLUGIN_AUTOLOAD=1."
    ]


def test_misspelled_hook_fails_loudly(installed):
    installed(FakeEntryPoint("typo", "llmc-typo", plugin_module("typo", method_class("t"), hook="llmc_register_method")))
    with pytest.raises(LlmcError) as exc:
        plugins.new_manager()
    msg = str(exc.value)
    assert "Plugin 'llmc-typo:typo' (llmc-typo) implements an unknown hook 'llmc_register_method'." in msg
    assert "Did you mean 'llmc_register_methods'?" in msg


def test_hook_without_hookimpl_marker_fails_loudly(installed):
    mod = types.ModuleType("unmarked")
    mod.llmc_register_methods = lambda register: register(method_class("never"))
    installed(FakeEntryPoint("unmarked", "llmc-unmarked", mod))
    with pytest.raises(LlmcError, match=r"Plugin 'llmc-unmarked:unmarked' \(llmc-unmarked\) defines llmc_register_methods without @hookimpl"):
        plugins.new_manager()


def test_hook_with_a_wrong_argument_name_fails_loudly(installed):
    mod = types.ModuleType("badargs")

    @hookimpl
    def llmc_register_methods(reg):
        reg(method_class("x"))

    mod.llmc_register_methods = llmc_register_methods
    installed(FakeEntryPoint("badargs", "llmc-badargs", mod))
    with pytest.raises(LlmcError, match=r"Plugin 'llmc-badargs:badargs' \(llmc-badargs\) has an invalid hook implementation.*reg"):
        plugins.new_manager()


def test_registration_hook_that_raises_is_named(installed):
    mod = types.ModuleType("raiser")

    @hookimpl
    def llmc_register_methods(register):
        raise KeyError("missing table")

    mod.llmc_register_methods = llmc_register_methods
    installed(FakeEntryPoint("raiser", "llmc-raiser", mod))
    with pytest.raises(LlmcError, match=r"Plugin 'llmc-raiser:raiser' \(llmc-raiser\) failed in llmc_register_methods: KeyError"):
        plugins.new_manager().registries()


@pytest.mark.parametrize(
    "cls, fragment",
    [
        (type("NotAMethod", (), {"name": "x"}), "is not a subclass of llmc_core.api.Method"),
        (type("Nameless", (Method,), {}), "registered a method class Nameless without a 'name'"),
    ],
)
def test_bad_classes_are_refused(installed, cls, fragment):
    installed(FakeEntryPoint("bad", "llmc-bad", plugin_module("bad", cls)))
    with pytest.raises(LlmcError, match=re.escape(fragment)):
        plugins.new_manager().registries()


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_autoload_off_skips_third_party(installed, monkeypatch, value):
    import llmc_plugins.methods.rtn as rtn

    # The third-party entry point would raise if it were loaded at all.
    installed(FakeEntryPoint("rtn", "llmc", rtn), FakeEntryPoint("broken", "llmc-broken", RuntimeError("loaded")))
    monkeypatch.setenv("LLMC_DISABLE_PLUGIN_AUTOLOAD", value)
    manager = plugins.new_manager()
    assert manager.names("method") == ["rtn"]
    assert set(manager.sources.values()) == {"llmc"}


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_autoload_stays_on_for_false_values(installed, monkeypatch, value):
    installed(FakeEntryPoint("broken", "llmc-broken", RuntimeError("loaded")))
    monkeypatch.setenv("LLMC_DISABLE_PLUGIN_AUTOLOAD", value)
    with pytest.raises(LlmcError, match="llmc-broken"):
        plugins.new_manager()


def test_allowlist_loads_only_the_named_distributions(installed, monkeypatch):
    import llmc_plugins.methods.rtn as rtn

    wanted = plugin_module("wanted", method_class("wanted"))
    installed(FakeEntryPoint("rtn", "llmc", rtn), FakeEntryPoint("w", "Llmc_Wanted", wanted), FakeEntryPoint("broken", "llmc-broken", RuntimeError("loaded")))
    monkeypatch.setenv("LLMC_LOAD_PLUGINS", " llmc-wanted ")  # pip's spelling rules: case and _ vs -
    manager = plugins.new_manager()
    assert manager.names("method") == ["rtn", "wanted"]
    assert set(manager.sources.values()) == {"llmc", "Llmc_Wanted"}
    monkeypatch.setenv("LLMC_LOAD_PLUGINS", "")  # set but empty: no third-party plugin
    assert plugins.new_manager().names("method") == ["rtn"]


def test_allowlist_naming_an_absent_distribution_is_an_error(installed, monkeypatch):
    import llmc_plugins.methods.rtn as rtn

    installed(FakeEntryPoint("rtn", "llmc", rtn), FakeEntryPoint("w", "llmc-wanted", plugin_module("w2", method_class("w2"))))
    monkeypatch.setenv("LLMC_LOAD_PLUGINS", "llmc-wantd")
    with pytest.raises(LlmcError, match=r"LLMC_LOAD_PLUGINS names llmc-wantd, which no installed distribution provides .*installed: llmc-wanted"):
        plugins.new_manager()


def test_discovery_is_lazy_and_cached(installed, monkeypatch):
    calls = []
    real = plugins.importlib.metadata.entry_points
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    assert calls == []
    first = plugins.get_manager()
    assert plugins.get_manager() is first
    assert calls == [{"group": "llmc"}]


def test_importing_the_core_loads_no_plugin():
    code = (
        "import sys, llmc_core.cli, llmc_core.config, llmc_core.plugins as p; "
        "assert p._MANAGER is None; "
        "loaded = [m for m in sys.modules if m.startswith('llmc_plugins.') or m == 'torch']; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_default_plugins_match_the_entry_points():
    import tomllib

    from llmc_plugins import DEFAULT_PLUGINS

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["llmc"]
    assert sorted(eps.values()) == sorted(DEFAULT_PLUGINS)


# -- in-process registration -------------------------------------------------------------------------


def test_register_and_unregister_by_name(fresh_plugins):
    manager = plugins.get_manager()
    cls = method_class("inproc")
    manager.register_module(plugin_module("inproc_mod", cls), name="test:inproc", distribution="test")
    assert manager.get("method", "inproc", "quant.method") is cls
    manager.unregister("test:inproc")
    assert "inproc" not in manager.names("method")
    manager.unregister("test:inproc")  # unknown names are ignored


def test_same_name_for_another_object_is_an_error(fresh_plugins):
    manager = plugins.get_manager()
    manager.register_module(plugin_module("a", method_class("a1")), name="test:same", distribution="test")
    mod = plugin_module("a_again", method_class("a1"))
    manager.register_module(manager.pm.get_plugin("test:same"), name="whatever", distribution="test")  # same object: no-op
    with pytest.raises(LlmcError, match="Plugin name 'test:same' is already registered"):
        manager.register_module(mod, name="test:same", distribution="test")
    manager.unregister("test:same")


def test_in_process_registration_is_checked_and_not_kept(fresh_plugins):
    manager = plugins.get_manager()
    before = set(manager.sources)
    with pytest.raises(LlmcError, match="unknown hook 'llmc_regster_methods'"):
        manager.register_module(plugin_module("typo", method_class("t"), hook="llmc_regster_methods"), name="test:typo", distribution="test")
    assert set(manager.sources) == before and not manager.pm.has_plugin("test:typo")
    manager.check_pending()  # the manager is still usable


def test_registered_helper_cleans_up(fresh_plugins):
    cls = type("Lines2", (Dataset,), {"name": "lines2"})
    with registered(plugin_module("ds_mod", cls, hook="llmc_register_datasets")) as manager:
        assert "lines2" in manager.names("dataset")
        assert manager.sources["test:ds_mod"] == "test"
    assert "lines2" not in plugins.get_manager().names("dataset")


def test_lifecycle_hooks_reach_an_in_process_plugin(fresh_plugins, tiny_model_dir, tiny_text_file, tmp_path):
    from llmc_core import config
    from llmc_core.run import Run
    from llmc_core.testing import run_config

    seen: list[str] = []
    mod = types.ModuleType("recorder")
    mod.llmc_run_start = hookimpl(lambda run: seen.append("start"))
    mod.llmc_evaluation_done = hookimpl(lambda run, record: seen.append(f"eval {record.position}"))
    mod.llmc_run_end = hookimpl(lambda run, error: seen.append(f"end {error}"))
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out")
    cfg["eval"]["num_samples"] = 2
    with registered(mod):
        Run(config.validate(cfg)).execute()
    assert seen == ["start", "eval pretrain", "eval fake_quant", "end None"]


# -- llmc plugins -------------------------------------------------------------------------------------


def test_plugins_json_schema_and_order(fresh_plugins):
    cls = method_class("zz_json")
    with registered(plugin_module("json_mod", cls), name="test:json", distribution="llmc-json"):
        first = run_cli("plugins", "--json")
        second = run_cli("plugins", "--json")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout  # stable output
    rows = json.loads(first.stdout)
    assert all(list(r) == ["class", "distribution", "kind", "name", "plugin"] for r in rows)
    kinds = list(plugins.KINDS)
    assert rows == sorted(rows, key=lambda r: (kinds.index(r["kind"]), r["name"]))
    rtn = next(r for r in rows if (r["kind"], r["name"]) == ("method", "rtn"))
    assert rtn["distribution"] == "llmc" and rtn["class"] == "llmc_plugins.methods.rtn.Rtn" and rtn["plugin"].startswith("llmc:")
    mine = [r for r in rows if r["name"] == "zz_json"]
    assert mine == [{"class": f"{cls.__module__}.{cls.__qualname__}", "distribution": "llmc-json", "kind": "method", "name": "zz_json", "plugin": "test:json"}]


def test_plugins_text_listing(fresh_plugins):
    doc = "A method whose summary\n    spans two lines.\n\n    Details that are not shown."
    with registered(plugin_module("text_mod", method_class("zz_text", doc)), distribution="llmc-text"):
        result = run_cli("plugins")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [line[:-1] for line in lines if not line.startswith(" ")]
    assert headers == [k for k in plugins.KINDS if k in headers] and "method" in headers
    assert f"  {'zz_text':<16} {'llmc-text':<20} A method whose summary spans two lines." in lines
    assert not any("Details" in line for line in lines)


def test_summary_is_the_first_paragraph_on_one_line():
    assert method_class("s", "First line\n    continues here.\n\n    Second paragraph.").summary() == "First line continues here."
    assert method_class("s", "").summary() == ""
    assert type("Undocumented", (Method,), {"name": "u"}).summary() == ""
