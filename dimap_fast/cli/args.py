"""What every command shares: the parser class and the value parsers of its flags.

A value parser raises ``argparse.ArgumentTypeError``; ``OneLineParser`` turns it, like every other
usage error, into one line on stderr and exit code 2. ``--pattern`` and ``--block-size`` become one
``Pattern`` value in ``args.pattern`` while the command line is parsed (``pattern_args``).
"""

from __future__ import annotations

import argparse

from ..engine.values import TILE_SIZES, METHODS, Pattern, check_reduction
from ..errors import DimapError, check_ratio

# what --pattern offers: a bare "block" takes --block-size (default 32), "block16" names its size
PATTERN_NAMES = ("unstructured", "block", *(f"block{b}" for b in TILE_SIZES), "channel", "2:4")

EXAMPLES = """\
examples:
  dimap-fast demo                                     prune a small Swin trained on digits
  dimap-fast prune swin_tiny_patch4_window7_224 --ratio 0.5 --out tiny50.safetensors
  dimap-fast prune ckpt.pth --model swin_base_patch4_window7_224 --ratio 0.35 --out b35.safetensors
  dimap-fast prune swin_tiny_patch4_window7_224 --flops-reduction 0.5 --out tiny_half_flops.safetensors
  dimap-fast report tiny50.safetensors --model swin_tiny_patch4_window7_224
  dimap-fast report tiny50.safetensors --json
  dimap-fast sweep swin_tiny_patch4_window7_224 swin_small_patch4_window7_224 \\
      --ratios 0.15,0.35,0.55 --methods dimap,uniform --out-dir sweeps/
  dimap-fast sweep swin_tiny_patch4_window7_224 --flops-reductions 0.3,0.5 --out-dir sweeps/
  dimap-fast finetune --data digits --ratio 0.7 --out runs/d70
  dimap-fast eval runs/d70/model.safetensors
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look), exit code 2."""

    combines_pattern = False  # set by pattern_args: --pattern and --block-size are read into one Pattern

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.combines_pattern:
            namespace.pattern = self._pattern(namespace.pattern, namespace.__dict__.pop("block_size", None))
        return namespace, extras

    def _pattern(self, name: str | None, block_size: int | None) -> Pattern | None:
        """The Pattern of ``--pattern NAME [--block-size B]``; None when neither was given."""
        if block_size is not None:
            if name is None or Pattern.parse(name).kind != "block":
                given = f"not --pattern {name}" if name is not None else "and no --pattern was given"
                self.error(f"argument --block-size: it sizes the tiles of --pattern block, {given}: "
                           f"use --pattern block --block-size {block_size}, or drop --block-size")
            if name != "block" and Pattern.parse(name).block_size != block_size:
                self.error(f"argument --block-size: --pattern {name} names its size already: drop --block-size {block_size}")
            return Pattern.block(block_size)
        return None if name is None else Pattern.parse(name)


def ratio(text: str) -> float:
    try:
        return check_ratio(float(text))
    except (ValueError, DimapError) as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, DimapError) else f"ratio must be a number in [0, 1), got {text!r}")


def _listed(text: str, parse, what: str, example: str) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"give {what} as a comma-separated list, e.g. {example}")
    return [parse(p) for p in parts]


def ratios(text: str) -> list[float]:
    return _listed(text, ratio, "ratios", "0.15,0.35,0.55")


def reduction(text: str) -> float:
    try:
        return check_reduction(float(text))
    except ValueError as exc:  # DimapError is one too
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, DimapError) else f"a FLOPs reduction must be a number in [0, 1), got {text!r}")


def reductions(text: str) -> list[float]:
    return _listed(text, reduction, "FLOPs reductions", "0.3,0.5")


def method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: choose from {', '.join(METHODS)}")
    return text


def methods(text: str) -> list[str]:
    return _listed(text, method, "methods", "dimap,uniform")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def pattern_args(p: argparse.ArgumentParser, default: str | None = "unstructured", when: str = "") -> None:
    """--pattern and --block-size; after parsing, ``args.pattern`` is a Pattern (None: neither given
    and no default) and there is no ``args.block_size``."""
    p.add_argument("--pattern", choices=PATTERN_NAMES, default=default,
                   help=when + "unstructured (the paper), block tiles (block = block32, or block16, block64), "
                        "channel (neurons and heads) or 2:4" + (f"; default {default}" if default else ""))
    p.add_argument("--block-size", type=int, choices=TILE_SIZES, default=None,
                   help="tile size for --pattern block (default 32)")
    p.combines_pattern = True


def format_sparsity(sp: dict) -> str:
    """The fraction removed per DIMAP module, as a table."""
    lines = [f"{'module':<10}{'removed':>10}"]
    lines += [f"{m:<10}{v:>10.2%}" for m, v in sp["modules"].items()]
    return "\n".join(lines)
