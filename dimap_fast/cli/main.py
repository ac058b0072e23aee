"""The ``dimap-fast`` parser and its entry point.

Every refusal is one line on stderr and exit code 2, with nothing written: usage errors through
``OneLineParser`` (the class of every subcommand's parser), a ``DimapError`` from a command here.
"""

from __future__ import annotations

import argparse
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
        return 143 if exc.args == ("SIGTERM",) else 130
    finally:
        if previous is not None:
            _on_sigterm(previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # stop as on Ctrl-C: the output being written removes its temporary file


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only, where signals arrive); returns the previous one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)
