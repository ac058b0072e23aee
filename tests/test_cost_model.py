"""The static cost model pinned on cases whose counts can be worked out by hand."""

from collections import Counter

import pytest

from dimap_fast.cost_model.capture import Replay
from dimap_fast.cost_model.hardware import H100
from dimap_fast.cost_model.kernel_cost import estimate, executions
from dimap_fast.cost_model.sass import Sass, parse

F = "/k.py"
# 3 instructions before the loop (lines 1-2), a 5-instruction loop body from source line 4 (the
# loop over lines 3-6, counted by line 4), the exit and its trap.
LISTING = f"""
	//## File "{F}", line 1
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDC R2, c[0x0][0x220] ;
	//## File "{F}", line 2
        /*0020*/                   IMAD.MOV.U32 R8, RZ, RZ, RZ ;
.L_x_0:
	//## File "{F}", line 4
        /*0030*/                   LDG.E R11, desc[UR4][R10.64] ;
        /*0040*/                   IADD3 R5, R5, 0x80, RZ ;
        /*0050*/                   ISETP.NE.AND P0, PT, R5, R2, PT ;
        /*0060*/                   FADD R8, R8, R11 ;
	//## File "{F}", line 3
        /*0070*/               @P0 BRA `(.L_x_0) ;
	//## File "{F}", line 7
        /*0080*/                   EXIT ;
.L_x_1:
        /*0090*/                   BRA `(.L_x_1);
"""


def _sass():
    insns, loops = parse(LISTING)
    return Sass(regs=32, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)


def test_listing_parses_into_one_loop():
    sass = _sass()
    assert len(sass.insns) == 10
    assert sass.loops == [(3, 7)]  # the trap's branch to itself is no loop


def test_instruction_count_equals_hand_count():
    sass = _sass()
    hits = {(F, 4): 10.0}  # the replayed programs ran the loop body 10 times each
    assert sum(executions(sass, [(3, 6, 4)], hits, F)) == 3 + 5 * 10 + 2


def test_copy_kernel_estimate_is_bytes_over_bandwidth():
    n, programs = 1 << 28, 1 << 16  # 256 MiB in, 256 MiB out: far past the L2
    per_program = n * 4 / programs
    rep = Replay(programs=1, line_hits=Counter(), atomics=0.0,
                 unique_bytes={"src": per_program, "dst": per_program},
                 footprint={"src": n * 4, "dst": n * 4})
    insns, loops = parse(LISTING.replace("@P0 BRA `(.L_x_0)", "NOP"))
    sass = Sass(regs=16, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)
    e = estimate("copy", sass, rep, F, [], programs)
    assert e.bytes == 2 * n * 4
    assert e.seconds == pytest.approx(2 * n * 4 / H100.copy_bytes_per_s)
    assert e.bound == "memory"


def test_small_tensors_are_charged_once():
    rep = Replay(programs=1, unique_bytes={"bias": 4096.0}, footprint={"bias": 4096})
    sass = _sass()
    e = estimate("k", sass, rep, F, [], 1000)
    assert e.bytes == 4096  # 1000 programs re-read it from L2, not DRAM
