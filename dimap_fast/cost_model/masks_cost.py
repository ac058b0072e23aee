"""``plan(state dict).masks(0.5)`` on CUDA (what the GPU check times as ``speed.plan.*``),
estimated from its own launch sequence.

The real code path runs under the interpreter on two stand-ins of the model (timm's Swin with
its real layers and modules at two tiny widths: the layer sizes shrink, the launch and read
sequence does not; the launchers pick their GPU tiles), and every Triton launch, torch op and
device-to-host read it makes is recorded; each Triton launch is also replayed (a few programs:
line hits, sectors touched) and later compiled for sm_90. The two runs must make the same
sequence. Each quantity is then carried to the real model's N prunable weights from the two
stand-ins: bytes and program counts linearly in N (they grow with the weights), a program's
instructions and dependent path linearly in log2 N (binary searches over a layer are the only
per-program work that grows).

Estimate = (Triton launches + torch ops) x launch cost + host reads x sync cost + torch bytes
over the copy rate + each Triton launch's max(compute, memory) (kernel_cost's wave model).
Each torch.sort is charged the bytes and launches of the path ATen takes at the REAL model's
layer sizes (torch_sort.py: the stand-ins' layers are small enough for its in-place path,
Swin-B's are not), its rows and their lengths carried over exactly. A gather (``t[idx]``)
reads its index and one 32-byte sector per element it gathers, not its whole source (the
byte tally charges the source whole: the difference is taken back here). The floor is one read
of the prunable weights (fp32).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .baselines import unique_bytes
from .torch_sort import sort_cost
from .workloads import TIMM_NAMES as MODELS

REAL_WIDTH = {"swin_t": 96, "swin_b": 128}
WIDTHS = {"swin_t": (3, 6), "swin_b": (4, 8)}  # stand-ins: each stage's heads still divide them
RATIO = 0.5
_SAMPLES = 4  # programs of each launch replayed for line hits and sectors
_SECTOR = 32


@dataclass
class MasksRun:
    """One stand-in's recorded run."""

    weights: int  # prunable
    torch_ops: int  # each a kernel launch on a GPU; sorts not included
    torch_bytes: float  # sorts not included
    syncs: int
    launches: list = field(default_factory=list)  # dicts: kernel, module, spec, grid, programs, replay, file, loops
    sorts: list = field(default_factory=list)  # torch.sort calls: (segments, length, key bytes)


@contextlib.contextmanager
def _host_reads(counter: list, active: list):
    # A CUDA tensor reaches the host through .cpu(), .tolist() or .item() / float() (the last two
    # are _local_scalar_dense, counted by the dispatch mode); .numpy() follows a .cpu().
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist")}

    def wrap(name):
        def f(self, *a, **k):
            if not active[0]:  # the interpreter's own copies, or a torch mode calling it again
                return saved[name](self, *a, **k)
            counter[0] += 1
            active[0] = 0
            try:
                return saved[name](self, *a, **k)
            finally:
                active[0] = 1
        return f

    for name in saved:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


class _Gathers(TorchDispatchMode):
    """Bytes the tally charged gathers beyond what they touch: a source read whole where only
    one sector per gathered element is."""

    def __init__(self):
        super().__init__()
        self.excess = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index.Tensor:
            whole = unique_bytes(args[0])
            self.excess += whole - min(whole, _SECTOR * out.numel())
        return out


@contextlib.contextmanager
def _gpu_tiles():
    """The scoring launchers pick the tiles they pick on a GPU (the interpreter runs those too,
    slower), so what is recorded and compiled is the GPU's launch: the interpreter's smaller
    tiles would be costed as more programs doing less each."""
    import importlib

    saved = []
    for name in ("apply", "importance", "select"):
        m = importlib.import_module(f"dimap_fast.kernels.{name}")
        for attr, value in (("interpreting", lambda kernel: False),
                            ("default_block", lambda kernel, gpu, interp: gpu)):
            if hasattr(m, attr):
                saved.append((m, attr, getattr(m, attr)))
                setattr(m, attr, value)
    try:
        yield
    finally:
        for m, attr, value in reversed(saved):
            setattr(m, attr, value)


@contextlib.contextmanager
def _patched_once():
    """Speed only: the interpreter patches triton.language again at every @jit helper call (most
    of a masks() run's time); inside a kernel it is patched already, the same way."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    original, patched = interpreter._patch_lang, set()  # the language modules patched now

    class _Kept:
        def restore(self):
            pass

    def patch(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs <= patched:
            return _Kept()
        outer = not patched
        patched.update(langs)
        scope = original(fn)
        if outer:
            restore = scope.restore

            def restore_outer():
                patched.clear()
                restore()
            scope.restore = restore_outer
        return scope

    interpreter._patch_lang = patch
    try:
        yield
    finally:
        interpreter._patch_lang = original


def run(model: str, width: int) -> MasksRun:
    """Inside the interpreter worker: plan(state dict).masks(RATIO) of one stand-in, recorded."""
    import timm
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime import interpreter

    from ..engine.plan import plan
    from . import capture
    from .baselines import count_bytes

    torch.manual_seed(0)
    sd = timm.create_model(MODELS[model], pretrained=False, embed_dim=width).state_dict()
    launches, reads, active = [], [0], [1]
    original = interpreter.InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        active[0] = 0  # the interpreter's own copies are no host reads, its torch ops no launches
        try:
            with _disable_current_modes():
                copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                launch = capture.Launch(self, capture._grid(grid, self, args, kwargs), copies, kwargs)
                file = self.fn.__code__.co_filename
                launches.append(dict(module=self.fn.__module__, kernel=launch.name, grid=launch.grid,
                                     programs=launch.programs, spec=capture.spec(launch),
                                     replay=capture.replay(launch, samples=_SAMPLES), file=file,
                                     loops=capture.source_loops(file)))
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            active[0] = 1

    interpreter.InterpretedFunction.run = recorded
    try:
        with _gpu_tiles(), _patched_once(), _host_reads(reads, active), count_bytes(real=True) as ops, \
                _Gathers() as gathers:
            p = plan(sd, backend="triton")
            p.masks(RATIO)
    finally:
        interpreter.InterpretedFunction.run = original
    weights = sum(layer.tensor.numel() for layer in p.layers)
    return MasksRun(weights, ops.count - len(ops.sorts), ops.bytes - ops.sort_bytes - gathers.excess,
                    ops.syncs + reads[0], launches, ops.sorts)


@dataclass
class MasksEstimate:
    model: str
    weights: int
    launches: int  # Triton
    torch_ops: int
    syncs: int
    torch_bytes: float
    kernel_bytes: float
    kernel_s: float  # the Triton launches' own time
    slowest: str  # the Triton launch that takes longest, and why
    sort_bytes: float = 0.0
    sort_launches: int = 0
    sort_paths: str = ""  # the paths torch.sort takes, with their share of the sorted elements

    def seconds(self, gpu) -> float:
        return ((self.launches + self.torch_ops) * gpu.launch_s + self.syncs * gpu.sync_s
                + gpu.memory_seconds(self.torch_bytes) + self.kernel_s + self.sort_seconds(gpu))

    def sort_seconds(self, gpu) -> float:
        return self.sort_launches * gpu.launch_s + gpu.memory_seconds(self.sort_bytes)

    def floor_seconds(self, gpu) -> float:
        return gpu.memory_seconds(4 * self.weights)


def _line(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    return y1 if x2 == x1 else y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def combine(model: str, small: MasksRun, large: MasksRun, sass: list, gpu) -> MasksEstimate:
    """The real model's estimate from two stand-ins' runs (``sass``: each launch of ``small``
    then of ``large`` compiled, in order)."""
    from .kernel_cost import ProgramCost, compute_cycles, program_cost, resident_blocks

    a, b = small.launches, large.launches
    if ([l["kernel"] for l in a] != [l["kernel"] for l in b] or small.syncs != large.syncs
            or [s[0] for s in small.sorts] != [s[0] for s in large.sorts]):
        raise RuntimeError(f"masks() of {model}: the two stand-ins launch different sequences "
                           f"({[l['kernel'] for l in a]}, sorts {[s[0] for s in small.sorts]} vs "
                           f"{[l['kernel'] for l in b]}, sorts {[s[0] for s in large.sorts]})")
    scale = (REAL_WIDTH[model] / WIDTHS[model][1]) ** 2
    n = round(large.weights * scale)  # every prunable weight is a Linear's: it grows as width^2
    lin = lambda y1, y2: max(y1, _line(small.weights, y1, large.weights, y2, n))  # noqa: E731
    log = lambda y1, y2: max(y1, _line(math.log2(small.weights), y1, math.log2(large.weights), y2,  # noqa: E731
                                       math.log2(n)))
    kernel_s, kernel_bytes, slowest = 0.0, 0.0, (0.0, "")
    for la, lb, sa, sb in zip(a, b, sass[:len(a)], sass[len(a):]):
        ca = program_cost(sa, la["replay"].line_hits, la["file"], la["loops"], gpu)
        cb = program_cost(sb, lb["replay"].line_hits, lb["file"], lb["loops"], gpu)
        cost = ProgramCost(log(ca.per_warp, cb.per_warp), log(ca.chain_cycles, cb.chain_cycles),
                           log(ca.mma_cycles, cb.mma_cycles))
        programs = round(lin(la["programs"], lb["programs"]))
        raw = [sum(r["replay"].unique_bytes.values()) * r["programs"] for r in (la, lb)]
        nbytes = lin(*raw)
        *_, cycles = compute_cycles(cost, programs, resident_blocks(sb, gpu), sb.num_warps, gpu)
        t = max(cycles / gpu.clock_hz, gpu.memory_seconds(nbytes))
        kernel_s, kernel_bytes = kernel_s + t, kernel_bytes + nbytes
        if t > slowest[0]:
            why = "memory" if gpu.memory_seconds(nbytes) >= cycles / gpu.clock_hz else "latency/issue"
            slowest = (t, f"{la['kernel']} {t * 1e6:.0f} us ({programs} programs, {why}-bound)")
    sort_bytes, sort_launches, paths = 0.0, 0, {}
    for segments, length, key in large.sorts:  # a sorted row is a layer: it grows as width^2 too
        nbytes, launches, path = sort_cost(segments, round(length * scale), key)
        sort_bytes, sort_launches = sort_bytes + nbytes, sort_launches + launches
        paths[path] = paths.get(path, 0) + segments * length
    total = sum(paths.values()) or 1
    shown = ", ".join(f"{path} {k / total:.0%}" for path, k in sorted(paths.items(), key=lambda kv: -kv[1]))
    return MasksEstimate(model, n, len(a), max(small.torch_ops, large.torch_ops), large.syncs,
                         lin(small.torch_bytes, large.torch_bytes), kernel_bytes, kernel_s, slowest[1],
                         sort_bytes, sort_launches, shown)
