"""Which code runs each pruned Linear: the fastest, measured, of dense and the sparse formats.

Candidates: ``"dense"`` (nn.Linear, F.linear) always; ``"kernel"`` (SparseLinear, the project's
block-sparse Triton kernel) on CUDA with Triton; ``"bsr"`` (BsrLinear, torch's BSR) where torch
multiplies BSR in that dtype on that device; ``"2:4"`` (SemiSparseLinear) on CUDA sm80+ for a
2:4-sparse weight. The sparse ones only for a weight with zeros to skip.

Times come from a small table keyed by device, torch version, dtype, rows (bucketed, capped),
out x in features, tile side, tile density (bucketed) and the candidate set. A missing entry is
measured once on a synthetic weight of that shape and density (so one measurement serves every
layer with the same key) and saved to ``linear_choices.json`` in the cache directory:
``$DIMAP_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/dimap_fast``, else ``~/.cache/dimap_fast``.
A sparse candidate must beat dense by ``MARGIN`` to be chosen: timing noise never makes a layer slower.
The kernel is not even a candidate where the static model says it cannot win (``kernel_can_win``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import find_adapter
from ..atomic import save_cache
from ..errors import DimapError
from ..host import cache_dir, cpu_model
from ..timing import synchronizer, time_interleaved
from .sparse_formats import BSR_DTYPES, SEMI_DTYPES, BsrLinear, SemiSparseLinear, is_2to4, semi_structured_supported
from .sparse_linear import KERNEL_DTYPES, SparseLinear, zero_smallest_tiles_

CANDIDATES = ("dense", "kernel", "bsr", "2:4")
CHOOSE = ("measured",) + CANDIDATES
ROWS_CAP = 8192  # past a few thousand rows every candidate is throughput-bound: the ranking holds
PROBE_ROWS = 128
DROP_FACTOR = 3.0  # a candidate this much slower than the best at PROBE_ROWS is not timed further
MARGIN = 0.05
DEFAULT_BATCH = 32
CACHE_NAME = "linear_choices.json"
_FORMAT = 1


def device_name(device) -> str:
    """What the timings depend on: the GPU's name, or the CPU's model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model()} {torch.get_num_threads()}t"


def rows_bucket(rows: int) -> int:
    """Rows rounded to the nearest half power of two, capped at ROWS_CAP: the rows measured."""
    return min(ROWS_CAP, max(1, round(2 ** (round(2 * math.log2(max(rows, 1))) / 2))))


def density_bucket(density: float) -> float:
    return min(1.0, max(0.05, round(density * 20) / 20))


@dataclass(frozen=True)
class LayerKey:
    """One entry of the table: the shape of the work, where it runs, and the candidates."""

    device: str
    dtype: str
    rows: int
    out_features: int
    in_features: int
    block: int
    density: float
    candidates: tuple[str, ...]
    torch_version: str = torch.__version__

    @classmethod
    def for_layer(cls, weight: torch.Tensor, rows: int, block: int, density: float,
                  candidates) -> "LayerKey":
        n, k = weight.shape
        return cls(device_name(weight.device), str(weight.dtype).replace("torch.", ""),
                   rows_bucket(rows), n, k, block, density_bucket(density), tuple(candidates))

    @property
    def text(self) -> str:
        return (f"{self.device}|torch {self.torch_version}|{self.dtype}|m{self.rows}|"
                f"n{self.out_features}|k{self.in_features}|b{self.block}|d{self.density:.2f}|"
                + ",".join(self.candidates))


@dataclass
class LayerChoice:
    """What convert did with one prunable Linear, and why."""

    name: str
    out_features: int
    in_features: int
    rows: int | None
    block: int | None
    tile_density: float | None
    dtype: str
    device: str
    chosen: str = "dense"
    times: dict = field(default_factory=dict)  # candidate -> seconds per call (None: dropped)
    note: str = ""


def build(kind: str, linear: nn.Linear, block: int) -> nn.Module:
    """The module running ``kind`` for ``linear``, sharing its Parameters (dense: linear itself)."""
    if kind == "dense":
        return linear
    if kind == "kernel":
        return SparseLinear.from_linear(linear, block)
    if kind == "bsr":
        return BsrLinear.from_linear(linear, block=block)
    if kind == "2:4":
        return SemiSparseLinear.from_linear(linear)
    raise DimapError(f"unknown linear format {kind!r}: choose one of {', '.join(CANDIDATES)}")


def kernel_can_win(out_features: int, in_features: int, density: float, dtype: torch.dtype) -> bool:
    """Whether skipping tiles can beat dense by MARGIN on a GPU, by the static cost model's H100
    constants: per row of x, both move (in + out) elements, dense does 2*in*out FLOPs (at cuBLAS's
    share of the tensor peak) and the kernel ``density`` of them. Where dense is bound by its
    bytes (Swin stage 1: K=128, the output write dominates), the kernel can only tie: no."""
    from ..cost_model.hardware import H100

    es = torch.empty((), dtype=dtype).element_size()
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "tf32")
    if kind == "tf32" and torch.get_float32_matmul_precision() == "highest":
        kind = "fp32"
    flop_s = 2.0 * in_features * out_features / (H100.tensor_peak(kind) * H100.cublas_fraction)
    byte_s = H100.memory_seconds((in_features + out_features) * es)
    return max(flop_s, byte_s) / max(density * flop_s, byte_s) >= 1.0 / (1.0 - MARGIN)


def candidates_for(weight: torch.Tensor, tile_sparsity: float, min_sparsity: float) -> list[str]:
    """The formats that can run this weight, in CANDIDATES order; dense always."""
    from .backend import kernels

    found = ["dense"]
    dev = weight.device
    if tile_sparsity >= min_sparsity and tile_sparsity > 0:
        if dev.type == "cuda" and kernels().HAVE_TRITON and weight.dtype in KERNEL_DTYPES and kernel_can_win(
                *weight.shape, 1.0 - tile_sparsity, weight.dtype):
            found.append("kernel")
        if weight.dtype in BSR_DTYPES.get(dev.type, ()):
            found.append("bsr")
    if semi_structured_supported(dev) and weight.dtype in SEMI_DTYPES \
            and is_2to4(weight):
        found.append("2:4")
    return found


def synthetic_linear(key: LayerKey, device) -> nn.Linear:
    """A Linear of the key's shape and dtype whose ``block`` tiles have the key's density (and
    2:4 rows when 2:4 is a candidate): what the table's timings are measured on."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(key.out_features, key.in_features, generator=gen)
    zero_smallest_tiles_(w, 1.0 - key.density, key.block)
    if "2:4" in key.candidates:
        groups = w.view(key.out_features, -1, 4)
        groups.scatter_(2, groups.abs().topk(2, dim=2, largest=False).indices, 0.0)
    lin = nn.Linear(key.in_features, key.out_features, device="meta")
    dtype = getattr(torch, key.dtype)
    lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    lin.bias = nn.Parameter(torch.randn(key.out_features, generator=gen).to(device=device, dtype=dtype),
                            requires_grad=False)
    return lin


@torch.no_grad()
def measure(key: LayerKey, device, reps: int = 5) -> dict[str, float | None]:
    """Seconds per call of each candidate on ``key``'s work (None: failed, or dropped at the probe)."""
    device = torch.device(device)
    lin = synthetic_linear(key, device)
    mods, times = {}, {}
    for kind in key.candidates:
        try:
            mods[kind] = build(kind, lin, key.block)
        except Exception:  # noqa: BLE001 - a format torch cannot build here is no candidate
            times[kind] = None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(key.rows, key.in_features, generator=gen).to(device=device, dtype=lin.weight.dtype)
    sync = synchronizer(device)
    probe = x[:PROBE_ROWS]
    ok = {}
    for kind, mod in mods.items():
        try:
            mod(probe)  # warms up (packs, compiles) and proves the format runs this shape
            ok[kind] = mod
        except Exception:  # noqa: BLE001
            times[kind] = None
    if key.rows > PROBE_ROWS and len(ok) > 1:
        fast = time_interleaved({k: (lambda m=m: m(probe)) for k, m in ok.items()}, 2, sync)
        best = min(fast.values())
        for kind in [k for k, t in fast.items() if t > DROP_FACTOR * best and k != "dense"]:
            times[kind] = None
            del ok[kind]
    # the probe warmed every survivor up; past the MARGIN test, 2x dense's time cannot win
    times.update(time_interleaved({k: (lambda m=m: m(x)) for k, m in ok.items()}, reps, sync,
                                  warmup=key.rows <= PROBE_ROWS, give_up=2.0))
    return {k: times[k] for k in key.candidates}


class ChoiceTable:
    """Timings per LayerKey: read from the cache file, measured when missing, saved on ``save``.

    ``path``: the JSON file (default: CACHE_NAME in ``cache_dir()``), or False for none.
    ``measure``: ``f(key, device) -> {candidate: seconds or None}`` (tests inject a fake)."""

    def __init__(self, path=None, measure: Callable = measure):
        self.path = None if path is False else Path(path) if path else cache_dir() / CACHE_NAME
        self.measure = measure
        self._entries = None
        self._new = {}

    def _load(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if data.get("format") != _FORMAT or not all(
                    isinstance(v, dict) and all(t is None or isinstance(t, (int, float))
                                                for t in v.values()) for v in entries.values()):
                raise ValueError("unexpected layout")
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            warnings.warn(f"ignoring the unreadable timing cache {self.path} ({err}); "
                          "measuring again", stacklevel=3)
            return {}

    @property
    def entries(self) -> dict:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def times(self, key: LayerKey, device) -> tuple[dict, bool]:
        """(times per candidate, whether they came from the table)."""
        found = self.entries.get(key.text)
        if found is not None and set(found) == set(key.candidates):
            return found, True
        got = self.measure(key, device)
        self.entries[key.text] = self._new[key.text] = got
        return got, False

    def save(self) -> None:
        """Add the new timings to the file (atomically, keeping entries others wrote meanwhile)."""
        if self.path is None or not self._new:
            return
        merged = self._load()
        merged.update(self._new)
        if save_cache(self.path, json.dumps({"format": _FORMAT, "entries": merged}, indent=1, sort_keys=True),
                      "the timing cache"):
            self._new = {}


def fastest(times: dict) -> str:
    """The candidate to run: the fastest sparse one when it beats dense by MARGIN, else dense."""
    dense = times.get("dense")
    timed = {k: t for k, t in times.items() if t is not None and k != "dense"}
    if dense is None or not timed:
        return "dense"
    kind = min(timed, key=timed.get)
    return kind if timed[kind] < (1.0 - MARGIN) * dense else "dense"


def agrees(module: nn.Module, linear: nn.Linear, rows: int = 16) -> bool:
    """Whether ``module`` computes ``linear``'s output (to the dtype's rounding) on a random input."""
    w = linear.weight
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, linear.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, w, linear.bias).float()
        got = module(x).float()
    tol = 2e-3 if w.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(torch.isfinite(got).all()) and bool(
        (got - want).abs().max() <= tol * want.abs().max().clamp_min(1e-6))


def rows_per_call(model: nn.Module, names, example_input=None, batch_size=None) -> dict[str, int]:
    """Rows each named Linear multiplies per call on the workload: one forward of
    ``example_input`` (rows as seen, times ``batch_size`` if given), or of one image of the model's
    input size times ``batch_size`` (default DEFAULT_BATCH)."""
    scale = batch_size if batch_size is not None else (1 if example_input is not None else DEFAULT_BATCH)
    if example_input is None:
        example_input = _one_image(model)
    seen = {}

    def hook(mod, args, name):
        if name not in seen and args and torch.is_tensor(args[0]):
            seen[name] = args[0].numel() // max(args[0].shape[-1], 1)

    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as err:  # noqa: BLE001 - whatever the model raised, the fix is the same
        raise DimapError(f"convert could not run the model on a {tuple(example_input.shape)} input "
                         f"to count each Linear's rows ({type(err).__name__}: {err}); pass "
                         "example_input= a batch like the ones it will run") from err
    finally:
        for h in handles:
            h.remove()
    return {n: r * scale for n, r in seen.items()}


def _one_image(model: nn.Module) -> torch.Tensor:
    shape = find_adapter(model).input_size(model)  # timm: patch_embed follows set_input_size
    if shape is None:
        raise DimapError("convert(choose='measured') needs to know how many rows each Linear "
                         "multiplies: pass example_input= a batch like the ones the model will run")
    p = next(model.parameters())
    return torch.zeros(1, *shape, device=p.device, dtype=p.dtype)


def format_choices(report) -> str:
    """``model.dimap_convert_report`` (or a model holding one) as a text table, times in ms
    ("-": not a candidate there, "x": failed or over DROP_FACTOR x the best at the probe)."""
    report = getattr(report, "dimap_convert_report", report)
    head = ["layer", "out x in", "rows", "block", "density", "chosen"] + [
        f"{c} ms" for c in CANDIDATES] + ["note"]
    lines = [head]
    for r in report:
        times = [("-" if c not in r.times else "x" if r.times[c] is None else f"{r.times[c] * 1e3:.3g}")
                 for c in CANDIDATES]
        lines.append([r.name, f"{r.out_features}x{r.in_features}", "-" if r.rows is None else str(r.rows),
                      "-" if r.block is None else str(r.block),
                      "-" if r.tile_density is None else f"{r.tile_density:.2f}", r.chosen]
                     + times + [r.note])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    counts = {c: sum(r.chosen == c for r in report) for c in CANDIDATES}
    text.append("chosen: " + ", ".join(f"{n} {c}" for c, n in counts.items() if n))
    return "\n".join(text)


def measure_table(shapes, densities=(0.5, 0.25, 0.1), blocks=(32, 64), dtype=torch.float32,
                  device="cpu", table: ChoiceTable | None = None) -> list[dict]:
    """Fill (and save) the table for every (rows, out, in) in ``shapes`` x tile density x block:
    what ``dimap-fast bench`` can run once per machine so that convert finds every entry.
    Returns one dict per entry: the key's fields, the times and the candidate chosen."""
    device = torch.device(device)
    table = table if table is not None else ChoiceTable()
    found = []
    for rows, n, k in shapes:
        for block in blocks:
            for density in densities:
                probe = torch.empty(n, k, device="meta", dtype=dtype)
                cands = [c for c in CANDIDATES if c == "dense" or _runs(c, probe, device)]
                key = LayerKey(device_name(device), str(dtype).replace("torch.", ""),
                               rows_bucket(rows), n, k, block, density_bucket(density), tuple(cands))
                times, cached = table.times(key, device)
                found.append(dict(rows=key.rows, out_features=n, in_features=k, block=block,
                                  density=key.density, dtype=key.dtype, device=key.device,
                                  times=times, chosen=fastest(times), cached=cached))
    table.save()
    return found


def _runs(kind: str, weight: torch.Tensor, device: torch.device) -> bool:
    # 2:4 needs a 2:4 weight: not part of a tile-density grid
    from .backend import kernels

    if kind == "kernel":
        return device.type == "cuda" and kernels().HAVE_TRITON and weight.dtype in KERNEL_DTYPES
    return kind == "bsr" and weight.dtype in BSR_DTYPES.get(device.type, ())
