"""Every segment's magnitudes |x| sorted descending, all segments at once: a keys-only LSD radix sort.

Keys are the float32 bit patterns of |x| (non-negative floats order as their bits), complemented
in 31 bits so that an ascending sort of the keys is a descending sort of |x|; NaN patterns lie
above +inf, so NaN comes first, as in torch's descending sort (NaNs of different payloads are
ordered by payload). Segments are cut into chunks that never cross a segment's end, and each of
the ``31 / RADIX_BITS`` passes is the same fixed sequence whatever the segment count:

1. ``_chunk_counts``: a program per chunk, the histogram of its digits;
2. ``_scan_counts``: a program per (segment, digit tile), each digit's count in the segment's
   earlier chunks (an exclusive scan down the chunks) and the segment's totals;
3. torch: the segment's start plus the totals of the smaller digits (an [S, RADIX] table);
4. ``_scatter_chunk``: a program per chunk ranks its elements by (digit, position) with
   ``tl.sort``, so equal digits keep their order (the pass is stable), and writes each key to
   its segment start + smaller digits + earlier chunks + rank.

The first pass reads the values' bits and the last writes float32 magnitudes, so no pass is
spent converting. Integer counts only: the result is exact, equal to the reference bit for bit.

Speed: the rank is the cost. tl.sort of 4096 keys is a bitonic network, ~28k sm_90 instructions
a warp at 168 registers (3 blocks an SM), ~4 ms a pass over Swin-B's 84M weights in the static
model, where the passes' bytes take ~0.3 ms (estimates, H100). A cheaper stable rank (a warp's
match or shared-memory counters, as CUB's) has no Triton primitive; until one does, the engine
sorts with torch.sort (dimap_fast.engine.triton_scores).
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import LaunchConfig, check_runnable, device_guard, pointer, tl, triton

RADIX_BITS = 11  # 3 passes cover the 31 bits of a magnitude
RADIX = 1 << RADIX_BITS
KEY_BITS = 31
CHUNK = 4096  # elements a scatter program ranks with one tl.sort
_CHUNK_WARPS = 4
_SCAN_ROWS = 16  # chunks a scan step reads at once
_SCAN_DIGITS = 128
_SCAN_WARPS = 4
_MASK31 = 0x7FFFFFFF


@triton.jit
def _key(bits, FIRST: tl.constexpr):
    if FIRST:  # the value's float32 bits: |x| complemented, so ascending keys are descending |x|
        bits = 0x7FFFFFFF ^ (bits & 0x7FFFFFFF)
    return bits


@triton.jit
def _chunk_counts(src_ptr, offsets_ptr, chunk_seg_ptr, chunk_start_ptr, counts_ptr,
                  SHIFT: tl.constexpr, FIRST: tl.constexpr, CHUNK: tl.constexpr,
                  RADIX: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(chunk_seg_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    end = tl.load(offsets_ptr + seg + 1)
    idx = start + tl.arange(0, CHUNK)
    valid = idx < end
    key = _key(tl.load(src_ptr + idx, mask=valid, other=0), FIRST)
    digit = tl.where(valid, (key >> SHIFT) & (RADIX - 1), 0)
    bins = tl.arange(0, RADIX)
    # Masked lanes were counted in bin 0: take them out.
    hist = tl.histogram(digit, RADIX) - tl.where(bins == 0, CHUNK - tl.sum(valid.to(tl.int32), 0), 0)
    tl.store(counts_ptr + pid.to(tl.int64) * RADIX + bins, hist)


@triton.jit
def _scan_counts(counts_ptr, seg_chunks_ptr, totals_ptr, RADIX: tl.constexpr, ROWS: tl.constexpr,
                 DIGITS: tl.constexpr):
    seg = tl.program_id(0)
    digit = tl.program_id(1) * DIGITS + tl.arange(0, DIGITS)
    c0 = tl.load(seg_chunks_ptr + seg)
    c1 = tl.load(seg_chunks_ptr + seg + 1)
    row = tl.arange(0, ROWS)
    run = tl.zeros((DIGITS,), tl.int32)
    for r0 in range(c0, c1, ROWS):
        rows = r0 + row
        ok = (rows < c1)[:, None]
        at = counts_ptr + rows.to(tl.int64)[:, None] * RADIX + digit[None, :]
        tile = tl.load(at, mask=ok, other=0)
        tl.store(at, tl.cumsum(tile, 0) - tile + run[None, :], mask=ok)  # in place: earlier chunks
        run += tl.sum(tile, 0)
    tl.store(totals_ptr + seg.to(tl.int64) * RADIX + digit, run)


@triton.jit
def _scatter_chunk(src_ptr, dst_ptr, offsets_ptr, chunk_seg_ptr, chunk_start_ptr, before_ptr,
                   base_ptr, SHIFT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                   CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr, RADIX: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(chunk_seg_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    end = tl.load(offsets_ptr + seg + 1)
    lane = tl.arange(0, CHUNK)
    idx = start + lane
    valid = idx < end
    key = _key(tl.load(src_ptr + idx, mask=valid, other=0), FIRST)
    digit = (key >> SHIFT) & (RADIX - 1)
    # Sorting (digit, lane) ranks the chunk stably by digit; masked lanes (digit RADIX) sort last.
    order = tl.sort(tl.where(valid, digit, RADIX) << LOG_CHUNK | lane)
    d = order >> LOG_CHUNK
    ok = d < RADIX
    d = tl.minimum(d, RADIX - 1)
    from_lane = order & (CHUNK - 1)
    bins = tl.arange(0, RADIX)
    hist = tl.histogram(tl.where(valid, digit, 0), RADIX) - tl.where(
        bins == 0, CHUNK - tl.sum(valid.to(tl.int32), 0), 0)
    first = tl.gather(tl.cumsum(hist, 0) - hist, d, 0)  # where this chunk's digit d starts when sorted
    moved = _key(tl.load(src_ptr + start + from_lane, mask=ok, other=0), FIRST)
    before = tl.load(before_ptr + pid.to(tl.int64) * RADIX + d, mask=ok, other=0)
    base = tl.load(base_ptr + seg.to(tl.int64) * RADIX + d, mask=ok, other=0)
    dest = base + before + (lane - first)
    if LAST:  # back to the magnitude's float32 bits
        moved = 0x7FFFFFFF ^ moved
    tl.store(dst_ptr + dest, moved, mask=ok)


class SortTables:
    """The chunk table of some segment sizes, built on the host once (no device reads) and kept."""

    def __init__(self, sizes, device, chunk: int = CHUNK):
        sizes = np.asarray(sizes, dtype=np.int64)
        nchunk = -(-sizes // chunk)
        seg_chunks = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(nchunk, out=seg_chunks[1:])
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        seg = np.repeat(np.arange(sizes.size), nchunk)
        start = offsets[seg] + (np.arange(seg.size) - seg_chunks[seg]) * chunk
        self.chunk, self.segments, self.chunks, self.n = chunk, int(sizes.size), int(seg.size), int(offsets[-1])
        put = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        self.offsets, self.seg_chunks = put(offsets), put(seg_chunks)
        self.chunk_seg, self.chunk_start = put(seg.astype(np.int32)), put(start)
        self.starts = self.offsets[:-1, None]


def sort_from_tables(values: torch.Tensor, t: SortTables) -> torch.Tensor:
    """segmented_sort_descending without the checks: ``values`` is contiguous float32 laid out as ``t``."""
    dev = values.device
    out = torch.empty(t.n, dtype=torch.float32, device=dev)
    if t.chunks == 0:
        return out
    shifts = list(range(0, KEY_BITS, RADIX_BITS))
    counts = torch.empty(t.chunks * RADIX, dtype=torch.int32, device=dev)
    totals = torch.empty((t.segments, RADIX), dtype=torch.int32, device=dev)
    # Passes alternate between out and one buffer, ending in out.
    spare = torch.empty(t.n, dtype=torch.int32, device=dev) if len(shifts) > 1 else None
    src = values.view(torch.int32)
    log_chunk = t.chunk.bit_length() - 1
    with device_guard(dev):
        for p, shift in enumerate(shifts):
            first, last = p == 0, p == len(shifts) - 1
            dst = out.view(torch.int32) if (len(shifts) - 1 - p) % 2 == 0 else spare
            _chunk_counts[(t.chunks,)](src, t.offsets, t.chunk_seg, t.chunk_start, counts, SHIFT=shift,
                                       FIRST=first, CHUNK=t.chunk, RADIX=RADIX, num_warps=_CHUNK_WARPS)
            _scan_counts[(t.segments, RADIX // _SCAN_DIGITS)](counts, t.seg_chunks, totals, RADIX=RADIX,
                                                              ROWS=_SCAN_ROWS, DIGITS=_SCAN_DIGITS,
                                                              num_warps=_SCAN_WARPS)
            base = t.starts + (totals.cumsum(1) - totals)  # int64: segment start + smaller digits
            _scatter_chunk[(t.chunks,)](src, dst, t.offsets, t.chunk_seg, t.chunk_start, counts, base,
                                        SHIFT=shift, FIRST=first, LAST=last, CHUNK=t.chunk,
                                        LOG_CHUNK=log_chunk, RADIX=RADIX, num_warps=_CHUNK_WARPS)
            src = dst
    return out


def _check(values, offsets, chunk) -> np.ndarray:
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError(f"values must be a 1-D float32 tensor, got "
                         f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64:
        raise ValueError("offsets must be a 1-D int64 tensor")
    host = offsets.detach().cpu().numpy()
    if host.size < 1 or host[0] != 0 or host[-1] != values.numel() or (np.diff(host) < 0).any():
        raise ValueError(f"offsets must rise from 0 to the flat length {values.numel()}, got {host.tolist()[:8]}")
    if chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 2, got {chunk}")
    return host


def segmented_sort_descending(values: torch.Tensor, offsets: torch.Tensor, *, chunk: int = CHUNK
                              ) -> torch.Tensor:
    """Float32 |values| of each segment ``offsets[s]:offsets[s+1]`` sorted descending, in place of
    the segment. Segments may be empty. ``chunk``: elements per scatter program (tests shrink it
    to reach several chunks with few elements)."""
    host = _check(values, offsets, chunk)
    check_runnable(_scatter_chunk, values.device, "segmented_sort_descending")
    return sort_from_tables(values.contiguous(), SortTables(np.diff(host), values.device, chunk))


def segmented_sort_descending_reference(values: torch.Tensor, offsets: torch.Tensor, *,
                                        chunk: int = CHUNK) -> torch.Tensor:
    """Plain-torch segmented_sort_descending: torch.sort of each segment's |values|."""
    host = _check(values, offsets, chunk)
    return torch.cat([torch.sort(values[a:b].abs(), descending=True).values
                      for a, b in zip(host[:-1], host[1:])] + [values.new_zeros(0)])


def launch_configs() -> list[LaunchConfig]:
    """What segmented_sort_descending launches on a GPU: a counts and a scatter compile per pass, one scan."""
    i32, i64 = pointer(torch.int32), pointer(torch.int64)
    table = dict(offsets_ptr=i64, chunk_seg_ptr=i32, chunk_start_ptr=i64)
    shifts = list(range(0, KEY_BITS, RADIX_BITS))
    out = [LaunchConfig.of(_scan_counts, f"segmented_sort _scan_counts RADIX={RADIX}",
                           dict(counts_ptr=i32, seg_chunks_ptr=i64, totals_ptr=i32),
                           dict(RADIX=RADIX, ROWS=_SCAN_ROWS, DIGITS=_SCAN_DIGITS), _SCAN_WARPS)]
    for p, shift in enumerate(shifts):
        flags = dict(SHIFT=shift, FIRST=p == 0)
        out.append(LaunchConfig.of(_chunk_counts, f"segmented_sort _chunk_counts SHIFT={shift} CHUNK={CHUNK}",
                                   dict(table, src_ptr=i32, counts_ptr=i32),
                                   dict(flags, CHUNK=CHUNK, RADIX=RADIX), _CHUNK_WARPS))
        out.append(LaunchConfig.of(_scatter_chunk, f"segmented_sort _scatter_chunk SHIFT={shift} CHUNK={CHUNK}",
                                   dict(table, src_ptr=i32, dst_ptr=i32, before_ptr=i32, base_ptr=i64),
                                   dict(flags, LAST=p == len(shifts) - 1, CHUNK=CHUNK,
                                        LOG_CHUNK=CHUNK.bit_length() - 1, RADIX=RADIX), _CHUNK_WARPS))
    return out
