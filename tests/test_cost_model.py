"""The static cost model pinned on cases whose counts can be worked out by hand."""

import json
import os
from collections import Counter

import pytest

from dimap_fast.cost_model import report, worker
from dimap_fast.cost_model.capture import Launch, Replay, source_loops, spec
from dimap_fast.cost_model.hardware import H100
from dimap_fast.cost_model.kernel_cost import (ProgramCost, compute_cycles, estimate, executions,
                                               unroll)
from dimap_fast.cost_model.sass import Sass, parse

triton = pytest.importorskip("triton")
tl = triton.language

F = "/k.py"
# 3 instructions before the loop (lines 1-2), a 5-instruction loop body from source line 4 (the
# loop over lines 3-6, counted by line 4), the exit, its trap and the padding after it.
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
        /*00a0*/                   NOP;
"""


def _sass():
    insns, loops = parse(LISTING)
    return Sass(regs=32, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)


def test_listing_parses_into_one_loop():
    sass = _sass()
    assert len(sass.insns) == 9  # the trap after EXIT and the padding never run
    assert sass.loops == [(3, 7)]


def test_instruction_count_equals_hand_count():
    sass = _sass()
    hits = {(F, 4): 10.0}  # the replayed programs ran the loop body 10 times each
    assert sum(executions(sass, [(3, 6, 4)], hits, F)) == 3 + 5 * 10 + 1


WAITS = f"""
	//## File "{F}", line 1
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R9, R9, R10 ;
        /*0020*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0030*/                   FADD R8, R4, R5 ;
        /*0040*/                   LDG.E.64 R6, desc[UR4][R2.64+0x8] ;
        /*0050*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0060*/                   STG.E desc[UR4][R2.64], R7 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R11], desc[UR4][R2.64] ;
        /*0080*/                   LDGDEPBAR ;
        /*0090*/                   DEPBAR.LE SB0, 0x0 ;
        /*00a0*/                   EXIT ;
"""

# A loop whose copy is waited on by the DEPBAR at its top: a later iteration's.
PIPELINED = f"""
	//## File "{F}", line 1
.L_x_0:
        /*0000*/                   DEPBAR.LE SB0, 0x{{depth}} ;
{{filler}}        /*1000*/                   LDGSTS.E.BYPASS.128 [R11], desc[UR4][R2.64] ;
        /*1010*/                   LDGDEPBAR ;
        /*1020*/                   IADD3 R5, R5, 0x1, RZ ;
        /*1030*/                   ISETP.NE.AND P0, PT, R5, R2, PT ;
        /*1040*/               @P0 BRA `(.L_x_0) ;
        /*1050*/                   EXIT ;
"""


def test_load_waits_are_where_a_loaded_register_is_first_read():
    # R4's load, unrelated math, R5's load, then the first read of R4, 3 instructions after the
    # first load: one wait for both, 700 - 3 x 5 cycles; the 64-bit load into R6-R7 waited on by
    # the store reading R7, 2 later (690); the async copy at the DEPBAR after its commit (690).
    from dimap_fast.cost_model.kernel_cost import load_wait_cycles

    insns, loops = parse(WAITS)
    sass = Sass(regs=32, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)
    assert insns[4].writes == [6, 7] and insns[6].reads == [2, 3, 7] and insns[9].depth == 0
    assert (H100.dram_latency_cycles, H100.alu_latency_cycles) == (700, 5)
    assert load_wait_cycles(sass, [1.0] * len(insns)) == 685 + 690 + 690
    assert load_wait_cycles(sass, [2.0] * len(insns)) == 2 * (685 + 690 + 690)  # as often as it runs
    # a consumer 140 instructions or more after its load finds the data there: no wait
    filler = "".join(f"        /*{0x1000 + 16 * i:04x}*/  IADD3 R9, R9, 0x1, RZ ;\n" for i in range(140))
    far = WAITS.replace("        /*0030*/", filler + "        /*0030*/")
    insns, loops = parse(far)
    sass = Sass(regs=32, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)
    assert load_wait_cycles(sass, [1.0] * len(insns)) == 0 + 690 + 690


def _loop(depth: int) -> Sass:
    filler = "".join(f"        /*{0x10 + 16 * i:04x}*/  FADD R9, R9, R10 ;\n" for i in range(20))
    insns, loops = parse(PIPELINED.format(depth=depth, filler=filler))
    return Sass(regs=32, shared=0, spill=0, num_warps=4, insns=insns, loops=loops)


def test_a_pipelined_copy_is_waited_on_in_a_later_iteration():
    from dimap_fast.cost_model.kernel_cost import load_wait_cycles

    # A body of 26 instructions, the copy the 22nd: 5 instructions to the body's end. One group
    # in flight allowed (depth 1): the copy's group is waited on at the top of the iteration
    # after next, 26 more; none (depth 0): at the next iteration's top.
    one, none = _loop(1), _loop(0)
    assert one.loops == [(0, 25)] and one.insns[0].depth == 1 and none.insns[0].depth == 0
    assert load_wait_cycles(none, [1.0] * 26 + [1.0]) == 700 - 5 * 5
    assert load_wait_cycles(one, [1.0] * 26 + [1.0]) == 700 - 5 * (5 + 26)
    assert load_wait_cycles(one, [3.0] * 26 + [1.0]) == 3 * (700 - 5 * (5 + 26))  # each iteration


@triton.jit
def _sum_rows(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i * BLOCK + offs)
    tl.store(out_ptr + offs, acc)


def test_fresh_sm90_compile_counts_a_known_loop_by_hand(monkeypatch):
    # BLOCK = 128 floats over 4 warps: every warp loads one float a thread per iteration, adds it,
    # and stores once at the end. ptxas unrolls the loop (a main body, copies and a remainder);
    # whatever it does, a warp executes exactly n loads, n adds and one store.
    import torch

    n = 37
    launch = Launch(_sum_rows, (1, 1, 1), (torch.zeros(128 * n), torch.empty(128), n),
                    {"BLOCK": 128, "num_warps": 4})
    # compiled in the model's worker, away from this process's interpreter (as the report does)
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    [sass] = worker.call("compile", [(_sum_rows.fn.__module__, "_sum_rows", spec(launch))])
    assert sass.num_warps == 4 and sass.spill == 0
    code = _sum_rows.fn.__code__
    loops = [l for l in source_loops(code.co_filename) if l[0] == code.co_firstlineno + 4]
    hits = {(code.co_filename, loops[0][2]): float(n)}  # the loop body's line ran n times
    execs = executions(sass, loops, hits, code.co_filename)
    by_op = Counter()
    for insn, e in zip(sass.insns, execs):
        by_op[insn.op.split(".")[0]] += e
    assert (by_op["LDG"], by_op["FADD"], by_op["STG"]) == (n, n, 1)
    main = max(sass.loops, key=lambda ab: ab[1] - ab[0])
    u = unroll(sass, *main)
    assert u is not None and by_op["LDG"] == u * execs[main[0]]  # the main body ran n / u times


@triton.jit
def _add_rows(x_ptr, out_ptr, n, BLOCK: tl.constexpr, SEM: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for i in range(0, n):
        tl.atomic_add(out_ptr + offs, tl.load(x_ptr + i * BLOCK + offs), sem=SEM)


def test_atomic_bytes_equal_the_hand_count(monkeypatch):
    # BLOCK = 128 floats over 4 warps: each iteration every lane adds one float, 512 bytes a
    # program; n iterations, 3 programs.
    import torch

    from dimap_fast.cost_model.kernel_cost import atomic_bytes

    n, programs = 11, 3
    launches = [Launch(_add_rows, (programs, 1, 1), (torch.zeros(128 * n), torch.zeros(128), n),
                       {"BLOCK": 128, "SEM": sem, "num_warps": 4}) for sem in ("relaxed", "acq_rel")]
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    relaxed, fenced = worker.call("compile", [(_add_rows.fn.__module__, "_add_rows", spec(l))
                                              for l in launches])
    code = _add_rows.fn.__code__
    loops = [l for l in source_loops(code.co_filename) if l[0] == code.co_firstlineno + 3]
    execs = executions(relaxed, loops, {(code.co_filename, loops[0][2]): float(n)}, code.co_filename)
    assert atomic_bytes(relaxed, execs) * relaxed.num_warps * programs == n * 128 * 4 * programs
    # relaxed: plain reductions; acq_rel (triton's default): a GPU-wide fence around each
    assert relaxed.fenced_atomics_in_loops() == 0
    assert fenced.fenced_atomics_in_loops() > 0


@triton.jit
def _plus_one(x):
    return x + 1.0


@triton.jit
def _sum_rows_twice(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n):
        acc += _plus_one(tl.load(x_ptr + i * BLOCK + offs)) \
            + _plus_one(tl.load(x_ptr + offs))
    tl.store(out_ptr + offs, acc)


class _SumRowsTwice:
    """A workload for the model's capture worker: one launch of a loop of 9 iterations."""

    name = "sum_rows_twice"
    trips = 9

    def run(self, steady=lambda: None):
        import torch

        _sum_rows_twice[(1,)](torch.zeros(16 * self.trips), torch.empty(16), self.trips, BLOCK=16)


@triton.jit
def _masked_copy(x_ptr, out_ptr, flag, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = (offs < BLOCK) & (flag != 0)  # a block and a scalar: the interpreter's mask is 0/1 ints
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m, other=0.0), mask=m)


class _MaskedCopy:
    name = "masked_copy"

    def run(self, steady=lambda: None):
        import torch

        _masked_copy[(1,)](torch.zeros(128), torch.empty(128), 1, BLOCK=128)


def test_replay_reads_a_mixed_mask_as_lanes_not_indices(monkeypatch):
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    [captured] = worker.call("capture", [_MaskedCopy()])
    [launch] = captured["launches"]
    assert launch["replay"].unique_bytes == {"x_ptr": 512, "out_ptr": 512}  # 128 floats each way


def test_replay_counts_a_multiline_loop_body_once_an_iteration(monkeypatch):
    # The body's one statement spans two lines and calls a helper twice: Python raises a line
    # event each time its evaluation comes back to a line, 18 for 9 iterations here. The model
    # once read those as 27 iterations (a 12x12 window's key loop, 4x over).
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    [captured] = worker.call("capture", [_SumRowsTwice()])
    [launch] = captured["launches"]
    code = _sum_rows_twice.fn.__code__
    [loop] = [l for l in launch["loops"] if l[0] == code.co_firstlineno + 4]
    assert loop[2] == code.co_firstlineno + 5  # the body's first line counts its runs
    assert launch["replay"].line_hits[(launch["file"], loop[2])] == _SumRowsTwice.trips


def test_attention_workloads_charge_what_every_later_call_costs():
    # The first call folds the bias tile (and builds the geometry's constants); inference reuses
    # the tile, a training step (the table changed) folds it again from the table alone.
    from dimap_fast.cost_model.workloads import Attention

    fwd, train = worker.call("capture", [Attention("swin_t", 3, "fp16", batch=1),
                                         Attention("swin_t", 3, "fp16", batch=1, backward=True)])
    assert [l["kernel"] for l in fwd["launches"]] == ["_window_attn_fwd"]
    assert fwd["torch_ops"] == 0
    assert [l["kernel"] for l in train["launches"]] == ["_window_attn_fwd", "_window_attn_bwd_one"]
    assert 0 < train["torch_ops"] <= 16


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


def test_an_out_argument_is_charged_once_and_in_place_reads_and_writes():
    import torch

    from dimap_fast.cost_model.baselines import count_bytes

    a, b, c = torch.zeros(1000), torch.zeros(1000), torch.empty(1000)
    with count_bytes(real=True) as into:
        torch.add(a, b, out=c)  # reads a and b, writes c
    with count_bytes(real=True) as in_place:
        a.add_(b)  # reads a and b, writes a
    assert into.bytes == in_place.bytes == 3 * 4000


def test_small_tensors_are_charged_once():
    rep = Replay(programs=1, unique_bytes={"bias": 4096.0}, footprint={"bias": 4096})
    e = estimate("k", _sass(), rep, F, [], 1000)
    assert e.bytes == 4096  # 1000 programs re-read it from L2, not DRAM


def test_waves_and_tail_by_hand():
    cost = ProgramCost(per_warp=1000.0, chain_cycles=3000.0, mma_cycles=0.0)
    # 133 programs over 132 SMs: one SM runs 2; with 1 resident block, 2 waves of its chain.
    waves, issue, chain, tensor, cycles = compute_cycles(cost, 133, 1, 4, H100)
    assert (waves, cycles) == (2, 2 * 3000.0)
    # 8 resident blocks of 4 warps: 8 warps a scheduler issue 8000 cycles, more than the chain.
    waves, issue, chain, tensor, cycles = compute_cycles(cost, 132 * 8, 8, 4, H100)
    assert (waves, cycles) == (1, 8 * 1000.0)


def test_estimate_for_reads_the_cached_report_and_never_builds(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CACHE", tmp_path / "static_report.json")
    assert report.estimate_for("speed.plan.swin_b") is None  # no report: None, nothing compiled
    report.write_json(report.CACHE, [report._row("masks.swin_b.cuda", 2.5, "ms")])
    data = json.loads(report.CACHE.read_text())
    assert data["kind"] == "estimate" and data["results"][0]["kind"] == "estimate"
    assert set(data["results"][0]) >= {"name", "value", "unit", "target", "met"}
    assert data["results"][0]["met"] is True
    assert report.estimate_for("speed.plan.swin_b") == 2.5
    assert report.estimate_for("speed.no_such_row") is None


def test_gpu_rows_name_rows_the_report_makes():
    from dimap_fast.cost_model.workloads import attention_workloads, sparse_workloads

    made = {w.name for w in attention_workloads() + sparse_workloads()}
    for gpu_row, row in report.GPU_ROWS.items():
        assert row.startswith("masks.") or row.rsplit(".", 1)[0] in made, (gpu_row, row)


def test_masks_estimate_carries_bytes_linearly_to_the_real_size():
    from dimap_fast.cost_model import masks_cost

    # 0.1 byte a weight at both stand-ins (Swin-B widths 4 and 8: 4x the weights): 0.1 at 128.
    small = masks_cost.MasksRun(weights=1000, torch_ops=10, torch_bytes=100.0, syncs=2)
    large = masks_cost.MasksRun(weights=4000, torch_ops=10, torch_bytes=400.0, syncs=2)
    e = masks_cost.combine("swin_b", small, large, [], H100)
    assert e.weights == 4000 * (128 // 8) ** 2
    assert e.torch_bytes == pytest.approx(0.1 * e.weights)
    assert e.seconds(H100) == pytest.approx(10 * H100.launch_s + 2 * H100.sync_s
                                            + 0.1 * e.weights / H100.copy_bytes_per_s)
    with pytest.raises(RuntimeError, match="different sequences"):
        masks_cost.combine("swin_b", small, masks_cost.MasksRun(4000, 10, 400.0, 3), [], H100)


def test_bench_static_bad_json_path_is_one_line_and_writes_nothing(tmp_path, capsys):
    from dimap_fast.cli import main

    assert main(["bench", "--static", "--json", str(tmp_path)]) != 0  # a folder: refused first
    assert main(["bench", "--json", str(tmp_path / "s.json")]) != 0  # --json without --static
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is a directory" in err[0] and "--static" in err[1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, way, gpu_row", [
    ("bias_grad", "sum", "speed.attn_train.swin_b384.s1.fp16.bias_sum_vs_flush"),
    ("kv_prefetch", "on", "speed.attn.swin_b384.s1.fp16.kv_prefetch_vs_off")])
def test_way_ratio_pairs_the_two_ways_of_a_workload(setting, way, gpu_row):
    from dimap_fast.cost_model.workloads import Attention

    shape = dict(image=384, window=12, backward=setting == "bias_grad",
                 batch=32 if setting == "bias_grad" else 128)
    default = Attention("swin_b", 0, "fp16", **shape)
    other = Attention("swin_b", 0, "fp16", **shape, **{setting: way})
    assert other.name != default.name
    rows = [report._row(f"{default.name}.block_vs_eager", 2.0, "x"),
            report._row(f"{other.name}.block_vs_eager", 1.5, "x"),
            report._row("attention.fwd_bwd.swin_t.s1.fp16.block_vs_eager", 3.0, "x")]
    [row] = report.way_rows(rows)
    # t_default / t_other: the same timm baseline on both sides, so the ratio of the two ratios
    assert row["value"] == pytest.approx(0.75)
    assert report.GPU_ROWS[gpu_row] == row["name"] and row["name"].startswith(f"{default.name}.")
