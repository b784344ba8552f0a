"""The command line: cheap commands never import torch; version and plugin listing."""

from __future__ import annotations

import subprocess
import sys

from llmc_core import __version__
from llmc_core.testing import run_cli

NO_TORCH = "import sys; from llmc_core.cli import main; code = main({args}); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"


def _fresh(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH.format(args=args)], capture_output=True, text=True, timeout=120)


def test_help_and_plugins_do_not_import_torch():
    assert _fresh(["plugins"]).returncode == 0
    res = subprocess.run([sys.executable, "-c", "import sys; import llmc_core.cli as c\ntry:\n c.main(['--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_validate_does_not_import_torch(tiny_model_dir, tiny_text_file, tmp_path, write_yaml):
    from llmc_core.testing import run_config

    path = write_yaml(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o"))
    res = _fresh(["validate", str(path)])
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_version():
    res = run_cli("--version")
    assert res.exit_code == 0 and __version__ in res.stdout


def test_plugins_lists_kinds_with_distribution():
    res = run_cli("plugins")
    assert res.exit_code == 0
    for kind in ("model:", "dataset:", "preproc:", "method:", "evaluator:", "saver:"):
        assert kind in res.stdout
    assert "rtn" in res.stdout and "llmc" in res.stdout


def test_no_command_prints_help_and_exits_2():
    res = run_cli()
    assert res.exit_code == 2
    assert res.stdout.startswith("usage: llmc")  # the help, not an error or nothing
    for command in ("run", "validate", "plugins"):
        assert f"\n    {command} " in res.stdout, command  # each command listed with its summary
