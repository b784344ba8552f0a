"""``llmc run | validate | export | plugins``.

``--help``, ``validate`` and ``plugins`` never import torch (``validate`` does for a config whose
``base.device`` names CUDA, to check the device is there); user mistakes print one line per
problem and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
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
        if name == "run":
            s.add_argument("--resume", action="store_true", help="continue an interrupted run from the checkpoint in save.save_path (needs save.checkpoint_blocks: true)")
    help_text = "write a real-int format (vllm, awq) from SAVE_PATH/fake_quant_model, without calibrating again"
    s = sub.add_parser("export", help=help_text, description=help_text)
    s.add_argument("save_path", metavar="SAVE_PATH", help="the save.save_path of a run that had save.save_fake: true")
    s.add_argument("--to", required=True, metavar="FORMAT", help="vllm: compressed-tensors -> SAVE_PATH/vllm_quant_model; awq: AutoAWQ GEMM -> SAVE_PATH/awq_model")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    s = sub.add_parser("plugins", help="list registered plugins by kind", description="list registered plugins by kind")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (in-process runners redirect it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always wins
        pass


def _setup_logging(args: argparse.Namespace) -> None:
    """llmc's own lines at INFO (``--quiet``: WARNING, ``--verbose``: DEBUG); other libraries keep
    their levels. Safe to call once per ``main()`` in one process (tests run the CLI in-process)."""
    level = logging.WARNING if getattr(args, "quiet", False) else logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    logging.getLogger("llmc").setLevel(level)


def _fitted(cfg) -> bool:
    """A saver narrowed the weight spec the config wrote (e.g. GGUF's float16 grid)."""
    from llmc_core.quant.spec import QuantSpec

    raw = (cfg.raw.get("quant") or {}).get("weight")
    return isinstance(raw, dict) and QuantSpec.model_validate(raw) != cfg.scheme.weight


def cmd_validate(args: argparse.Namespace) -> int:
    from llmc_core import config

    cfg = config.load(args.config, args.overrides)
    what = f"method {cfg.quant.method_name} ({cfg.scheme.describe()})" if cfg.quant else "no quantization"
    print(f"{args.config}: OK — model {cfg.raw['model']['type']}, {what}, {len(cfg.evals)} evaluation(s).")
    if cfg.scheme is not None and (cfg.scheme.preset or not cfg.scheme.weight_only or _fitted(cfg)):  # the scheme as the run will use it
        import yaml

        print(yaml.safe_dump({"quant": cfg.scheme.as_dict()}, sort_keys=False).rstrip())
    return 0


def _progress_bars_on_terminal_only() -> None:
    if not sys.stderr.isatty():  # library progress bars (weight loading, GGUF conversion) only on a terminal
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported (a fresh process)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def cmd_run(args: argparse.Namespace) -> int:
    from llmc_core import config
    from llmc_core.run import Run

    _progress_bars_on_terminal_only()
    cfg = config.load(args.config, args.overrides, resume=args.resume)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # tqdm may already be imported (in-process runs)
    run = Run(cfg, resume=args.resume)
    try:
        with _sigterm_as_interrupt():
            run.execute()
    except KeyboardInterrupt as exc:
        why = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"llmc: interrupted ({why}) {run.describe_progress()}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every ``finally`` and atomic write
    cleans up on the way out."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_export(args: argparse.Namespace) -> int:
    from llmc_core.export import export

    _progress_bars_on_terminal_only()
    target = export(args.save_path, args.to, overwrite=args.overwrite)
    print(f"wrote {target}")
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
    args, extra = parser.parse_known_args(argv)
    # overrides may follow an option (``run cfg.yml --resume eval.num_samples=3``); argparse stops
    # filling a positional list at the first option, so pick up the KEY=VALUE items it left over
    if extra and all("=" in e and not e.startswith("-") for e in extra) and hasattr(args, "overrides"):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return USER_ERROR_EXIT
    _setup_logging(args)
    handler = {"run": cmd_run, "validate": cmd_validate, "export": cmd_export, "plugins": cmd_plugins}[args.command]
    try:
        return handler(args)
    except LlmcError as exc:
        print(exc.render(), file=sys.stderr)
        return USER_ERROR_EXIT
    except BrokenPipeError:  # e.g. `llmc plugins | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("llmc: interrupted; nothing half-written was left in the output folder.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
