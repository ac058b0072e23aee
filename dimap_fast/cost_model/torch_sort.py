"""What one torch.sort moves and launches on CUDA, path by path as ATen dispatches it.

torch.sort of a contiguous (segments, n) tensor along its last dimension always returns int64
indices. ATen (Sort.cpp, SortStable.cu) picks one of four paths:
- n <= 4096: the values copied, the indices filled, then one in-place key/index sort per
  segment in shared memory (sortKeyValueInplace);
- one segment, or n >= 1,000,000: n indices filled once, then a CUB radix sort of (key, int64
  index) pairs per segment;
- 2 to 127 segments: "segmented sort by full sort": (index, segment) int2 pairs filled, ONE CUB
  radix sort of (key, int2) pairs over every element, a second CUB sort of those pairs as int64
  keys on the segment bits only (one pass), and a kernel that writes the indices and gathers the
  values by them (a segment fits in L2, so the gather reads each value once from DRAM);
- 128 segments or more: the indices filled, then CUB's segmented sort of (key, int64) pairs
  (charged here as the per-segment radix sort: the least it can move).
CUB's radix sort (onesweep) reads the keys once for its histograms, then makes one pass per 8-bit
digit, each reading and writing keys and values; it launches a histogram kernel, an exclusive
sum and one kernel per pass.

The path matters: 8 of the 12 sort calls of Swin-B's plan take the full-sort path, which moves
about 1.45x what a per-segment radix sort of the same keys does, and the rows of a million keys or
more cost 7 kernels each. Estimates, not measurements.
"""

from __future__ import annotations

import math

SMALL = 4096  # at most: the in-place shared-memory sort
LARGE = 1_000_000  # at least: a radix sort per segment, even in a batch
SEGMENTED = 128  # segments, at least: CUB's segmented sort
_INDEX = 8  # bytes of torch's int64 index


def radix_bytes(key: int, value: int, bits: int | None = None) -> float:
    """Bytes an element of a CUB radix sort moves: histograms, then a pass per 8-bit digit."""
    passes = math.ceil((8 * key if bits is None else bits) / 8)
    return key + passes * 2 * (key + value)


def radix_launches(key: int, bits: int | None = None) -> int:
    return 2 + math.ceil((8 * key if bits is None else bits) / 8)


def sort_cost(segments: int, n: int, key: int = 4) -> tuple[float, int, str]:
    """(bytes, kernel launches, path) of torch.sort over ``segments`` rows of ``n`` keys of
    ``key`` bytes on CUDA."""
    total = segments * n
    if total == 0:
        return 0.0, 0, "empty"
    if n <= SMALL:
        return total * (2 * key + _INDEX + 2 * (key + _INDEX)), 3, "in-place"
    if segments == 1 or n >= LARGE:
        return (n * _INDEX + total * radix_bytes(key, _INDEX), 1 + segments * radix_launches(key),
                "radix per segment")
    if segments < SEGMENTED:
        bits = max(1, math.ceil(math.log2(segments)))
        per = (8  # the (index, segment) pairs filled
               + radix_bytes(key, 8)  # (key, int2) pairs, every element at once
               + radix_bytes(8, 0, bits)  # the pairs again, as int64 keys on the segment bits
               + 8 + key + _INDEX + key)  # pairs read, value gathered, index and value written
        return total * per, 1 + radix_launches(key) + radix_launches(8, bits) + 1, "full sort"
    return total * (_INDEX + radix_bytes(key, _INDEX)), 1 + radix_launches(key), "segmented"
