"""The ``dimap-fast`` parser and its entry point.

Every refusal is one line on stderr and exit code 2, with nothing written: usage errors through
``OneLineParser`` (the class of every subcommand's parser), a ``DimapError`` from a command here.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import DimapError
from . import bench, demo, evaluate, finetune, prune, report, sweep
from .args import EXAMPLES, OneLineParser


# The commands in the order ``--help`` lists them; each module's add_parser sets ``run=``.
COMMANDS = [prune, report, sweep, bench, finetune, evaluate, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dimap-fast",
        description="DIMAP pruning (He & Zhou, ICLR 2024) for timm's Swin family.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the code so main() stays callable
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _on_sigterm(_terminate)
    try:
        run = getattr(args, "run", None) or args.func
        return run(args)
    except DimapError as exc:
        print(f"dimap-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("dimap-fast: interrupted; finished outputs are complete, nothing partial was left", file=sys.stderr)
        return INTERRUPTED[1] if exc.args == ("SIGTERM",) else INTERRUPTED[0]
    finally:
        if previous is not None:
            _on_sigterm(previous)


INTERRUPTED = (130, 143)  # exit codes after Ctrl-C and SIGTERM


def entry() -> None:
    """The process entry (the ``dimap-fast`` script, ``python -m dimap_fast.cli``): main(), then
    exit with its code. After an interrupt the process leaves at once (streams flushed, then
    ``os._exit``): its outputs are complete and its temporary files gone by then, and interpreter
    shutdown, with torch's worker threads stopped mid-op, can abort ("terminate called without an
    active exception", SIGABRT), losing the exit code a shell or a scheduler reads (seen once in a
    loaded test run, PyTorch issue 22924 describes the same)."""
    code = main()
    if code in INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # stop as on Ctrl-C: the output being written removes its temporary file


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only, where signals arrive); returns the previous one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)
