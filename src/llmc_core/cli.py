"""``llmc run | validate | plugins``.

``--help``, ``validate`` and ``plugins`` never import torch; user mistakes print one line per
problem and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmc_core import __version__
from llmc_core.errors import USER_ERROR_EXIT, LlmcError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc", description="Post-training compression of LLMs: load, calibrate, quantize, evaluate, save — one command.")
    p.add_argument("--version", action="version", version=f"llmc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("run", "run the whole job described by a config"), ("validate", "check a config without loading a model")):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("config", help="the YAML config")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.num_samples=3 save.save_path=/tmp/x")
        s.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results table")
        s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s = sub.add_parser("plugins", help="list registered plugins by kind", description="list registered plugins by kind")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from llmc_core import config

    cfg = config.load(args.config, args.overrides)
    what = f"method {cfg.quant.method} ({cfg.weight.describe()})" if cfg.quant else "no quantization"
    print(f"{args.config}: OK — model {cfg.raw['model']['type']}, {what}, {len(cfg.evals)} evaluation(s).")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llmc_core import config
    from llmc_core.run import Run

    cfg = config.load(args.config, args.overrides)
    Run(cfg).execute()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from llmc_core.plugins import get_manager

    entries = get_manager().entries()
    if args.json:
        rows = [{"kind": e.kind, "name": e.name, "distribution": e.distribution, "plugin": e.plugin, "class": f"{e.cls.__module__}.{e.cls.__qualname__}"} for e in entries]
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    kind = None
    for e in entries:
        if e.kind != kind:
            kind = e.kind
            print(f"{kind}:")
        summary = e.cls.summary() if hasattr(e.cls, "summary") else ""
        print(f"  {e.name:<16} {e.distribution:<20} {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USER_ERROR_EXIT
    _setup_logging(args)
    handler = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins}[args.command]
    try:
        return handler(args)
    except LlmcError as exc:
        print(exc.render(), file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("llmc: interrupted; nothing half-written was left in the output folder.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
