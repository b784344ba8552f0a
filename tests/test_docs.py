"""The docs are kept honest by tests: hook signatures, method docstrings, the tutorial's excerpts,
the files table and the example plugin must match the code."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from llmc_core import hookspecs, plugins
from llmc_core.quant import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PLUGIN_DOCS = DOCS / "plugins"
EXAMPLE = ROOT / "examples" / "llmc-plugin-example"
NO_PAPER = {"rtn"}  # the baseline: no paper to cite


def hook_signature(name: str) -> str:
    """``name(args) -> ret`` as ``inspect.signature`` renders it, without the quotes that
    ``from __future__ import annotations`` puts around every annotation."""
    return name + str(inspect.signature(getattr(hookspecs, name))).replace("'", "")


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of a markdown file."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def doc_files() -> list[Path]:
    return sorted(PLUGIN_DOCS.glob("*.md")) + [DOCS / "architecture.md"]


# -- hooks.md ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", hookspecs.all_hook_names())
def test_every_hook_spec_is_documented_with_its_signature(name):
    text = (PLUGIN_DOCS / "hooks.md").read_text(encoding="utf-8")
    assert f"\n### {name}\n" in text, f"docs/plugins/hooks.md has no section '### {name}'"
    assert hook_signature(name) in text, f"docs/plugins/hooks.md does not show the current signature: {hook_signature(name)}"


def test_hooks_md_documents_no_hook_that_does_not_exist():
    documented = re.findall(r"^### (\w+)$", (PLUGIN_DOCS / "hooks.md").read_text(encoding="utf-8"), flags=re.M)
    assert sorted(documented) == sorted(hookspecs.all_hook_names())


# -- method docstrings -----------------------------------------------------------------------------


def builtin_methods() -> list[type]:
    manager = plugins.new_manager(load_entry_points=False)
    plugins._load_defaults(manager)  # llmc's own plugins, whatever else is installed
    return [e.cls for e in manager.entries() if e.kind == "method"]


def example_module():
    spec = importlib.util.spec_from_file_location("llmc_plugin_example_for_docs", EXAMPLE / "llmc_plugin_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_examples(doc: str) -> list[dict]:
    """The reST literal blocks (indented text after a line ending in ``::``) that parse as YAML
    mappings with a ``quant`` section."""
    found = []
    for m in re.finditer(r"::\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", doc + "\n"):
        try:
            data = yaml.safe_load(textwrap.dedent(m.group(1)))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and isinstance(data.get("quant"), dict):
            found.append(data)
    return found


def method_cases() -> list:
    cases = [pytest.param(cls, id=cls.name) for cls in builtin_methods()]
    cases.append(pytest.param(example_module().AbsmaxMse, id="example:absmax_mse"))
    return cases


@pytest.mark.parametrize("cls", method_cases())
def test_method_docstring_has_paper_behaviour_yaml_and_fields(cls):
    doc = inspect.getdoc(cls) or ""
    where = f"{cls.__module__}.{cls.__qualname__}"
    assert cls.summary(), f"{where}: no one-line summary"
    if cls.name not in NO_PAPER:
        assert re.search(r"arxiv|paper|doi\.org", doc, flags=re.I), f"{where}: the docstring cites no paper"
    assert "What it does:" in doc or "What it does," in doc, f"{where}: no 'What it does' part"
    assert "What it does not do" in doc, f"{where}: no 'What it does not do' part"

    examples = yaml_examples(doc)
    assert examples, f"{where}: no YAML example (a literal block after '::' with a quant section)"
    for example in examples:
        quant = example["quant"]
        assert str(quant.get("method", "")).lower() in {cls.name, *cls.aliases}, f"{where}: the YAML example selects {quant.get('method')!r}"
        QuantSpec.model_validate(quant.get("weight", {}))
        cls.Config.model_validate(quant.get("special") or {})

    fields = sorted(cls.Config.model_fields)
    field_doc = doc + "\n" + (inspect.getdoc(cls.Config) or "")
    missing = [f for f in fields if f"``{f}``" not in field_doc]
    assert not missing, f"{where}: quant.special fields not documented: {', '.join(missing)}"
    if not fields:
        assert "no options" in doc, f"{where}: say that quant.special takes no options"


# -- the example plugin ------------------------------------------------------------------------------


def test_example_plugin_files_exist_and_agree():
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    entry_points = pyproject["project"]["entry-points"]["llmc"]
    assert list(entry_points.values()) == ["llmc_plugin_example"]
    assert pyproject["tool"]["setuptools"]["py-modules"] == ["llmc_plugin_example"]
    assert (EXAMPLE / "tests" / "test_example_plugin.py").is_file()
    tree = ast.parse((EXAMPLE / "llmc_plugin_example.py").read_text(encoding="utf-8"))
    hooks = {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and any(ast.unparse(d) == "hookimpl" for d in f.decorator_list)}
    assert hooks == {"llmc_register_methods", "llmc_register_datasets"}
    assert hooks <= set(hookspecs.all_hook_names())
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])}
    top_imports |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in top_imports, "the example plugin must not import torch at module level"


def test_example_plugin_is_documented():
    module = example_module()
    assert module.AbsmaxMse.Config.model_config.get("extra") == "forbid"
    assert module.Lines.summary()
    assert "llmc-plugin-example" in (PLUGIN_DOCS / "tutorial.md").read_text(encoding="utf-8")


# -- tutorial, index, files, architecture --------------------------------------------------------------


def test_tutorial_excerpts_match_the_example_verbatim():
    excerpts = 0
    for _lang, code in code_blocks(PLUGIN_DOCS / "tutorial.md"):
        first, _, body = code.partition("\n")
        m = re.fullmatch(r"# from (\S+)", first.strip())
        if not m:
            continue
        excerpts += 1
        source = (ROOT / m.group(1)).read_text(encoding="utf-8")
        assert body in source, f"docs/plugins/tutorial.md: an excerpt no longer matches {m.group(1)}:\n{body[:300]}"
    assert excerpts >= 5


PARSED = {"python", "yaml", "toml"}  # checked by a parser
SHOWN = {"bash", "console", "text", ""}  # shown as they are (commands, output, diagrams)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_code_blocks_parse(path):
    """Every fenced block is found and is of a known kind (a ``py`` or ``yml`` block would
    otherwise be skipped unchecked); every python, yaml and toml block parses."""
    blocks = code_blocks(path)
    fences = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("```")]
    assert len(fences) == 2 * len(blocks), f"{path.name}: {len(fences)} fence lines but {len(blocks)} blocks found (an unclosed fence?)"
    problems = []
    for i, (lang, code) in enumerate(blocks):
        where = f"{path.name} block {i + 1} ({lang or 'plain'})"
        if lang not in PARSED | SHOWN:
            problems.append(f"{where}: unknown language; use one of {sorted(PARSED | SHOWN)}")
            continue
        try:
            if lang == "python":
                if re.match(r"# from \S+\n", code):  # an excerpt, possibly of indented methods
                    code = textwrap.dedent(code.partition("\n")[2])
                elif re.fullmatch(r"llmc_\w+\(.*\) -> .+\n", code):  # a hook signature in hooks.md
                    code = f"def {code.strip()}: ..."
                compile(code, where, "exec")
            elif lang == "yaml":
                yaml.safe_load(code)
            elif lang == "toml":
                tomllib.loads(code)
        except (SyntaxError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    assert problems == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_index_describes_discovery():
    text = (PLUGIN_DOCS / "index.md").read_text(encoding="utf-8")
    for fact in ("[project.entry-points.llmc]", "LLMC_DISABLE_PLUGIN_AUTOLOAD=1", "DEFAULT_PLUGINS", "check_pending", "register_module", "unregister"):
        assert fact in text, f"docs/plugins/index.md does not mention {fact}"
    for kind, hook in plugins.KINDS.items():
        assert f"| `{kind}`" in text and f"`{hook}`" in text, f"docs/plugins/index.md: kind {kind} missing from the table"


def test_files_table_lists_every_core_module():
    text = (PLUGIN_DOCS / "files.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "src" / "llmc_core").rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"add a row to docs/plugins/files.md for: {', '.join(missing)}"
    for listed in re.findall(r"`(src/[^`]+)`", text):
        assert (ROOT / listed).exists(), f"docs/plugins/files.md lists {listed}, which does not exist"


def test_architecture_names_real_code():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    from llmc_core.run import Run

    for name in re.findall(r"`Run\.(\w+)", text):
        assert hasattr(Run, name), f"docs/architecture.md names Run.{name}, which does not exist"
    for path in re.findall(r"`(src/[\w/]+\.py)`", text):
        assert (ROOT / path).exists(), f"docs/architecture.md names {path}, which does not exist"
