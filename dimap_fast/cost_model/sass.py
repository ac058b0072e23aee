"""A kernel's sm_90 machine code, as a launch would get it: compiled here (no GPU needed), cached
on disk, and read into instructions with their source lines and the loops among them.

The compile takes the signature, constexprs and attributes triton's own binder derives from a
launch's arguments (``capture``), so integers equal to 1 and 16-divisible values are specialized
exactly as on a GPU. ``nvdisasm -g`` gives every SASS instruction its source line; a branch back
to an earlier label closes a loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

from ..atomic import write_text_atomic
from ..host import cache_dir

TARGET = ("cuda", 90, 32)
_CACHE = cache_dir() / "sass"

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")

_FORMAT = 5  # of the cached listing: bump when Insn or parse() changes (or when entries were wrong)
TENSOR_OPS = ("HGMMA", "HMMA", "QGMMA", "IMMA")
GLOBAL_OPS = ("LDG", "STG", "LDGSTS", "ATOMG", "RED", "REDG", "UBLKCP", "UTMALDG", "UTMASTG")


@dataclass
class Insn:
    offset: int
    op: str  # the opcode with its modifiers, e.g. "LDG.E.128"
    file: str
    line: int
    target: int = -1  # a branch's destination (an index into the instructions), else -1
    writes: list = field(default_factory=list)  # general registers (R numbers) it writes
    reads: list = field(default_factory=list)  # and reads
    depth: int = -1  # a DEPBAR's: it waits until at most this many async-copy groups are pending


@dataclass
class Sass:
    """What one compile produced: resources, and the instructions in program order."""

    regs: int
    shared: int  # bytes per block, triton's dynamic + the cubin's static
    spill: int  # bytes per thread: stack frame + local memory
    num_warps: int
    insns: list = field(default_factory=list)
    loops: list = field(default_factory=list)  # (first index, last index) of each loop body
    ptx_loops: list = field(default_factory=list)  # work histogram (``work_class``) of each PTX loop body

    def count(self, *prefixes: str, lo: int = 0, hi: int | None = None) -> int:
        hi = len(self.insns) - 1 if hi is None else hi
        return sum(i.op.split(".")[0] in prefixes for i in self.insns[lo:hi + 1])

    def loop_of(self, k: int) -> tuple[int, int] | None:
        """The innermost loop body holding instruction ``k`` (None outside every loop)."""
        return min((ab for ab in self.loops if ab[0] <= k <= ab[1]), key=lambda ab: ab[1] - ab[0],
                   default=None)

    def fenced_atomics_in_loops(self) -> int:
        """Atomics in a loop body that also holds a GPU- or system-scope MEMBAR (what acq_rel
        atomics compile to): each waits for the whole GPU. A CTA-scope MEMBAR (the fence before
        a wgmma reads shared memory) does not count."""
        n = 0
        for lo, hi in self.loops:
            ops = [i.op for i in self.insns[lo:hi + 1]]
            if any(op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op) for op in ops):
                n += sum(op.split(".")[0] in ("ATOMG", "RED", "REDG", "ATOM") for op in ops)
        return n


# Memory and matrix instructions, which ptxas neither merges nor splits: a loop's work, as classes
# that its PTX and its SASS both name, so SASS work / PTX work is ptxas's unroll factor.
_SASS_WORK = {"LDG": "ld", "LDGSTS": "cp", "STG": "st", "HGMMA": "mma", "QGMMA": "mma",
              "HMMA": "mma", "ATOMG": "atom", "RED": "atom", "REDG": "atom", "LDSM": "ldsm", "UTMALDG": "tma"}
_PTX_WORK = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld\.global|cp\.async\.c[ga]|st\.global|wgmma\.mma_async|"
                       r"mma\.sync|atom\.global|red\.global|ldmatrix|cp\.async\.bulk\.tensor)\b")
_PTX_CLASS = {"ld.global": "ld", "cp.async.cg": "cp", "cp.async.ca": "cp", "st.global": "st",
              "wgmma.mma_async": "mma", "mma.sync": "mma", "atom.global": "atom", "red.global": "atom",
              "ldmatrix": "ldsm", "cp.async.bulk.tensor": "tma"}
_PTX_LABEL = re.compile(r"^(\$L__BB\w+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);")


# Opcodes whose first operand is not a register they write.
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "REDG", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP",
            "BRA", "EXIT", "BAR", "MEMBAR", "SYNCS", "DEPBAR", "LDGDEPBAR", "CCTL", "RET", "CALL")
_REG = re.compile(r"(?<![A-Z_.])R(\d+)(\.64)?\b")
_WIDTH = {"64": 2, "128": 4}
_DEPTH = re.compile(r"SB0\s*,\s*(0x[0-9a-fA-F]+|\d+)")


def _registers(text: str) -> list[int]:
    return [int(n) + k for n, wide in _REG.findall(text) for k in range(2 if wide else 1)]


def operands(op: str, text: str) -> tuple[list[int], list[int]]:
    """(registers written, registers read) of one instruction: its first operand is what it
    writes (a load's as wide as its .64 / .128), unless the opcode writes no register."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    first = _REG.fullmatch(parts[0].split(".reuse")[0]) if parts else None
    if first is None or op.split(".")[0] in _NO_DEST:
        return [], _registers(text)
    width = max([_WIDTH.get(x, 1) for x in op.split(".")[1:]] + [2 if first.group(2) else 1])
    base = int(first.group(1))
    return list(range(base, base + width)), _registers(",".join(parts[1:]))


def work_class(op: str) -> str | None:
    return _SASS_WORK.get(op.split(".")[0])


def ptx_loops(ptx: str) -> list[dict]:
    """The work histogram of each PTX loop body (a branch back to an earlier label)."""
    lines = ptx.splitlines()
    labels, out = {}, []
    for k, line in enumerate(lines):
        if m := _PTX_LABEL.match(line):
            labels[m.group(1)] = k
        elif (m := _PTX_BRA.search(line)) and labels.get(m.group(1), k) < k:
            hist: dict[str, int] = {}
            for body in lines[labels[m.group(1)]:k]:
                if w := _PTX_WORK.match(body):
                    cls = _PTX_CLASS[w.group(1)]
                    hist[cls] = hist.get(cls, 0) + 1
            out.append(hist)
    return out


def parse(text: str) -> tuple[list[Insn], list[tuple[int, int]]]:
    """Instructions (with the source line each came from) and loop bodies of an nvdisasm -g listing."""
    insns, labels, branches = [], {}, []
    file, line, pending = "", 0, []
    for raw in text.splitlines():
        if m := _LINE.search(raw):
            file, line = m.group(1), int(m.group(2))
            continue
        if m := _LABEL.match(raw):
            pending.append(m.group(1))
            continue
        if m := _INSN.search(raw):
            op = m.group(3)
            for name in pending:
                labels[name] = len(insns)
            pending = []
            if op.startswith("BRA") and (t := _TARGET.search(m.group(4))):
                branches.append((len(insns), t.group(1)))
            writes, reads = operands(op, m.group(4))
            depth = _DEPTH.search(m.group(4)) if op.startswith("DEPBAR") else None
            insns.append(Insn(int(m.group(1), 16), op, file, line, writes=writes, reads=reads,
                              depth=int(depth.group(1), 0) if depth else -1))
    for i, t in branches:
        insns[i].target = labels.get(t, -1)
    # A branch to itself is the trap after the last EXIT: it and the NOP padding after it never run.
    traps = [i for i, t in branches if labels.get(t) == i]
    if traps:
        del insns[traps[-1]:]
    loops = sorted((labels[t], i) for i, t in branches if t in labels and labels[t] < i < len(insns))
    return insns, loops


def _tool(name: str) -> str:
    import triton

    knob = getattr(triton.knobs.nvidia, name)
    return knob.path


def _read_cubin(cubin: bytes) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        listing = subprocess.run([_tool("nvdisasm"), "-g", "-c", path], capture_output=True,
                                 text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    line = next(line for line in res.splitlines() if "REG:" in line)
    return listing, {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


def cache_key(module: str, kernel: str, spec: dict) -> str:
    import triton
    from triton.runtime.jit import JITFunction

    import importlib

    fn = getattr(importlib.import_module(module), kernel)
    jit = fn if isinstance(fn, JITFunction) else JITFunction(getattr(fn, "fn", fn))
    # The listing maps instructions to source lines by file path: another checkout recompiles.
    where = jit.fn.__code__.co_filename
    text = json.dumps([_FORMAT, triton.__version__, jit.cache_key, where, spec], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_sass(module: str, kernel: str, spec: dict) -> Sass:
    """Compile ``module.kernel`` for sm_90 with a launch's ``spec`` (signature, constexprs as
    [[path, value]], attrs as [[path, attr]], options); cached on disk by source and spec."""
    key = cache_key(module, kernel, spec)
    path = _CACHE / f"{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        data["insns"] = [Insn(**i) for i in data["insns"]]
        data["loops"] = [tuple(x) for x in data["loops"]]
        return Sass(**data)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), kernel)
    jit = fn if isinstance(fn, JITFunction) else JITFunction(getattr(fn, "fn", fn))
    constexprs = {tuple(p): v for p, v in spec["constexprs"]}
    attrs = {tuple(p): a for p, a in spec["attrs"]}
    # Triton's own cache keys on the source, not on its file: a kernel compiled first in another
    # checkout would come back with that checkout's paths in its line table, which parse() reads.
    knobs = triton.knobs.compilation
    saved, knobs.always_compile = knobs.always_compile, True
    try:
        compiled = triton.compile(ASTSource(jit, spec["signature"], constexprs, attrs),
                                  target=GPUTarget(*TARGET), options=spec["options"])
    finally:
        knobs.always_compile = saved
    listing, res = _read_cubin(compiled.asm["cubin"])
    insns, loops = parse(listing)
    out = Sass(regs=res["REG"], shared=compiled.metadata.shared + res["SHARED"],
               spill=res["STACK"] + res["LOCAL"], num_warps=compiled.metadata.num_warps,
               insns=insns, loops=loops, ptx_loops=ptx_loops(compiled.asm["ptx"]))
    _CACHE.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(out)))  # a reader never sees half a file
    return out
