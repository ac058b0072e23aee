"""The ``dimap-fast`` command line: one parser (``main``), one small module per command.

Each command module has ``add_parser(subparsers)``, which registers its flags and sets
``run=`` (a function of the parsed arguments returning the exit code); ``main.COMMANDS`` lists them.
"""

from .main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
