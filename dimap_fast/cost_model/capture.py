"""Inside a TRITON_INTERPRET=1 worker: what a launcher would launch on a GPU, and what a few of
those programs do.

``gpu_launches`` runs a launcher on real CPU tensors while it believes it is on a GPU (its
``interpreting`` / ``check_runnable`` / ``device_guard`` answer as on CUDA), so it picks its GPU
blocks, warps and stages; every ``kernel[grid](...)`` is recorded instead of run, and an
autotuned launch records one candidate per config. ``spec`` asks triton's own binder for the
signature, constexprs and alignment attributes the launch would compile with. ``replay`` then runs
a few of the launch's programs in the interpreter, counting the source lines they execute and
the memory they touch, so loop trip counts and bytes come from the launch itself.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Launch:
    kernel: object  # the InterpretedFunction
    grid: tuple
    args: tuple
    kwargs: dict
    candidate: bool = False  # one of an autotuner's configs, not a launch on its own

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))


@contextlib.contextmanager
def gpu_launches():
    """Collect the launches of the launchers called inside; nothing runs."""
    from triton.runtime import autotuner, interpreter

    modules = [m for n, m in list(sys.modules.items()) if n.startswith("dimap_fast.kernels")]
    launches: list[Launch] = []
    saved = []

    def patch(obj, name, value):
        if hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.append(Launch(self, _grid(grid, self, args, kwargs), args, kwargs))

    def record_tuned(self, *args, **kwargs):
        for cfg in self.configs:
            kw = {**kwargs, **cfg.all_kwargs()}
            launches.append(Launch(self.fn, _grid(kwargs["grid"], self.fn, args, kw), args,
                                   {k: v for k, v in kw.items() if k != "grid"}, candidate=True))

    for m in modules:
        patch(m, "interpreting", lambda kernel: False)
        patch(m, "check_runnable", lambda *a, **k: None)
        patch(m, "device_guard", lambda device: contextlib.nullcontext())
    patch(interpreter.InterpretedFunction, "run", record)
    patch(autotuner.Autotuner, "run", record_tuned)
    try:
        yield launches
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _grid(grid, kernel, args, kwargs):
    if callable(grid):
        names = kernel.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        grid = grid(bound)
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


def spec(launch: Launch) -> dict:
    """Signature, constexprs, attributes and options exactly as triton's binder derives them for
    an sm_90 launch with these arguments (JSON-able)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from .sass import TARGET

    jit = JITFunction(launch.kernel.fn)
    backend = make_backend(GPUTarget(*TARGET))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {k: v for k, v in launch.kwargs.items() if k in jit.arg_names
              or k in ("num_warps", "num_stages")}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization,
                                                           options)
    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas")}
    return {"signature": signature, "options": opts,
            "constexprs": [[list(p), v] for p, v in constexprs.items()],
            "attrs": [[list(p), a] for p, a in attrs.items()]}


@dataclass
class Replay:
    """Per-program averages over the replayed programs."""

    programs: int
    line_hits: Counter = field(default_factory=Counter)  # (file, line) -> hits per program
    unique_bytes: dict = field(default_factory=dict)  # argument -> bytes per program (32 B sectors)
    footprint: dict = field(default_factory=dict)  # argument -> bytes of its whole tensor
    atomics: float = 0.0  # atomic elements per program


def _sample(grid, n: int) -> list[tuple[int, int, int]]:
    total = int(np.prod(grid))
    flat = sorted(set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()))
    return [(f // (grid[1] * grid[2]), (f // grid[2]) % grid[1], f % grid[2]) for f in flat]


def replay(launch: Launch, samples: int = 6) -> Replay:
    """Run ``samples`` programs spread over the grid in the interpreter and average what they do."""
    from triton.runtime import interpreter as interp

    fn = launch.kernel.rewrite()
    executor = interp.GridExecutor(fn, launch.kernel.arg_names, launch.grid)
    names = inspect.getfullargspec(fn).args
    kwargs = {k: v for k, v in launch.kwargs.items() if k in names}
    args_hst, kwargs_hst = executor._init_args_hst(launch.args, kwargs)
    bound = inspect.getcallargs(fn, *args_hst, **kwargs_hst)
    ranges = {n: (a.data_ptr(), a.data_ptr() + a.untyped_storage().nbytes() - a.storage_offset()
                  * a.element_size(), a.untyped_storage().nbytes())
              for n, a in bound.items() if hasattr(a, "data_ptr")}
    out = Replay(len(_sample(launch.grid, samples)))
    out.footprint = {n: r[2] for n, r in ranges.items()}
    sectors: dict[str, set] = {n: set() for n in ranges}
    per_program: Counter = Counter()  # argument -> sectors, summed over programs
    builder = interp.interpreter_builder
    originals = {}

    def lanes(ptrs, mask):
        # a mask mixing a scalar and a block reaches here as 0/1 integers, maybe unbroadcast:
        # as booleans of the pointers' shape, or numpy would read them as indices
        return None if mask is None else np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)

    def touch(ptrs, mask):
        m = lanes(ptrs, mask)
        addr = ptrs.data[m] if m is not None else ptrs.data.ravel()
        if addr.size == 0:
            return
        for n, (lo, hi, _) in ranges.items():
            inside = addr[(addr >= lo) & (addr < hi)]
            if inside.size:
                sectors[n].update(np.unique(inside // 32).tolist())

    def load(ptrs, mask, other, *a):
        touch(ptrs, mask)
        return originals["create_masked_load"](ptrs, mask, other, *a)

    def store(ptrs, value, mask, *a):
        touch(ptrs, mask)
        return originals["create_masked_store"](ptrs, value, mask, *a)

    def atomic(op, ptrs, val, mask, *a):
        touch(ptrs, mask)
        out.atomics += float(lanes(ptrs, mask).sum()) if mask is not None else float(ptrs.data.size)
        return originals["create_atomic_rmw"](op, ptrs, val, mask, *a)

    for name, wrapper in (("create_masked_load", load), ("create_masked_store", store),
                          ("create_atomic_rmw", atomic)):
        originals[name] = getattr(builder, name)
        setattr(builder, name, wrapper)
    files = {launch.kernel.fn.__code__.co_filename}
    hits: Counter = Counter()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename not in files:
            return None
        starts = _statement_starts(frame.f_code)

        def local(frame, event, arg):
            # A statement over several lines raises a line event each time its evaluation moves
            # back to a line (after each call in it): only its first instruction counts a run.
            if event == "line" and starts.get(frame.f_lineno) == frame.f_lasti:
                hits[(frame.f_code.co_filename, frame.f_lineno)] += 1
            return local
        return local

    scope = interp._patch_lang(fn)
    try:
        call = {n: a if n in executor.constexprs else interp._implicit_cvt(a) for n, a in bound.items()}
        builder.set_grid_dim(*launch.grid)
        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            for x, y, z in _sample(launch.grid, samples):
                builder.set_grid_idx(x, y, z)
                fn(**call)
                for n, s in sectors.items():
                    per_program[n] += len(s)
                    s.clear()
        finally:
            sys.settrace(old)
    finally:
        scope.restore()
        for name, f in originals.items():
            setattr(builder, name, f)
    out.line_hits = Counter({k: v / out.programs for k, v in hits.items()})
    out.unique_bytes = {n: 32 * per_program[n] / out.programs for n in sectors}
    out.atomics /= out.programs
    return out


@functools.cache
def _statement_starts(code) -> dict[int, int]:
    """line -> the first bytecode offset of the code on that line (where its statement begins)."""
    starts: dict[int, int] = {}
    for start, _, line in code.co_lines():
        if line is not None and start < starts.get(line, start + 1):
            starts[line] = start
    return starts


def source_loops(filename: str) -> list[tuple[int, int, int]]:
    """Every for-loop of a source file: (first line, last line, line counted once per iteration)."""
    tree = ast.parse(open(filename).read())
    loops = []
    for node in ast.walk(tree):
        if isinstance(node, ast.For):
            body = next((s for s in node.body if not isinstance(s, (ast.For, ast.While))), node.body[0])
            loops.append((node.lineno, node.end_lineno, body.lineno))
    return loops
