"""Pattern and Method: built once, validated once, equal to their spelling; the old strings keep working."""

import pytest
import timm
import torch

import dimap_fast
from dimap_fast import DimapError, Method, Pattern
from dimap_fast.engine.values import TILE_SIZES, as_pattern

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def small_swin(seed=0):
    torch.manual_seed(seed)
    return timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()


@pytest.mark.parametrize("text,value,canonical", [
    ("unstructured", Pattern.unstructured(), "unstructured"),
    ("channel", Pattern.channel(), "channel"),
    ("block", Pattern.block(32), "block32"),
    ("block16", Pattern.block(16), "block16"),
    ("block64", Pattern.block(64), "block64"),
    ("2:4", Pattern.nm(2, 4), "2:4"),
    ("1:8", Pattern.nm(1, 8), "1:8"),
])
def test_parse_reads_every_spelling(text, value, canonical):
    parsed = Pattern.parse(text)
    assert parsed == value and str(parsed) == canonical
    assert Pattern.parse(parsed) is parsed
    assert parsed == canonical and hash(parsed) == hash(canonical)  # so code written against strings keeps working


def test_values_are_small_frozen_and_hashable():
    assert Pattern.block(16) != Pattern.block(32)
    assert Pattern.nm(2, 4) != Pattern.nm(1, 4)
    assert len({Pattern.block(32), Pattern.parse("block"), Pattern.block(16), Pattern.channel()}) == 3
    assert Pattern.block(16).block_size == 16 and Pattern.channel().block_size is None
    assert Pattern.nm(2, 4).fraction == 0.5 and Pattern.block(16).fraction is None
    assert Pattern.block(16).name == "block" and Pattern.nm(2, 4).name == "2:4"
    assert repr(Pattern.block(16)) == "Pattern.block(16)" and repr(Pattern.nm(2, 4)) == "Pattern.nm(2, 4)"
    with pytest.raises(AttributeError):
        Pattern.block(16).block_size = 32
    assert Pattern.block(16) != 16 and Pattern.block(16) != "block"  # "block" is a spelling, not the canonical one


def test_methods():
    assert [Method.parse(m) for m in ("dimap", "global", "uniform")] == [Method.DIMAP, Method.GLOBAL, Method.UNIFORM]
    assert Method.parse(Method.GLOBAL) is Method.GLOBAL
    assert Method.UNIFORM == "uniform" and str(Method.DIMAP) == "dimap" and f"{Method.GLOBAL}" == "global"
    assert dimap_fast.engine.values.METHODS == ("dimap", "global", "uniform")


BAD = [
    ("unknown name", lambda: Pattern.parse("diag"), "unknown pattern 'diag': choose one of unstructured, block, channel, 2:4"),
    ("not a string", lambda: Pattern.parse(32), "unknown pattern 32: choose one of unstructured, block, channel, 2:4"),
    ("bad block size", lambda: Pattern.block(48), "block_size must be one of (16, 32, 64), got 48"),
    ("bad block spelling", lambda: Pattern.parse("block8"), "block_size must be one of (16, 32, 64), got 8"),
    ("block size as bool", lambda: Pattern.block(True), "block_size must be one of (16, 32, 64), got True"),
    ("n not below m", lambda: Pattern.nm(4, 4), "an n:m pattern keeps n of every m weights, 0 < n < m: got 4:4"),
    ("n zero", lambda: Pattern.parse("0:4"), "an n:m pattern keeps n of every m weights, 0 < n < m: got 0:4"),
    ("block size on channel", lambda: Pattern("channel", block_size=32),
     "a block size belongs to the block pattern, not to 'channel': use Pattern.block(32) or drop the block size"),
    ("n on block", lambda: Pattern("block", 32, n=2, m=4), "n and m belong to the n:m pattern, not to 'block': use Pattern.nm(n, m)"),
    ("unknown kind", lambda: Pattern("diagonal"),
     "unknown pattern kind 'diagonal': use Pattern.unstructured(), Pattern.block(B), Pattern.channel() or Pattern.nm(n, m)"),
    ("unknown method", lambda: Method.parse("lamp"), "unknown method 'lamp': choose one of dimap, global, uniform"),
    ("value with block_size", lambda: as_pattern(Pattern.block(16), 16),
     "Pattern.block(16) carries its own block size: drop block_size=16"),
    ("name and size disagree", lambda: as_pattern("block16", 32), "pattern 'block16' and block_size=32 disagree: give the size once"),
    ("block_size with channel", lambda: as_pattern("channel", 16), "block_size=16 applies to pattern 'block' only, not 'channel': drop it"),
    ("plan: block_size with a value", lambda: dimap_fast.plan(small_swin(), pattern=Pattern.channel(), block_size=32),
     "Pattern.channel() carries its own block size: drop block_size=32"),
    ("plan: n:m other than 2:4", lambda: dimap_fast.plan(small_swin(), pattern="1:4"),
     "pattern '1:4' is not implemented: only 2:4 is (Pattern.nm(2, 4))"),
    ("plan: 2:4 at another ratio", lambda: dimap_fast.plan(small_swin(), pattern=Pattern.nm(2, 4)).masks(0.3),
     "pattern '2:4' always removes half of the weights: use ratio 0.5, not 0.3"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_wrong_choices_are_one_line_errors(call, message):
    with pytest.raises(DimapError) as info:
        call()
    assert str(info.value) == message


def test_block_size_goes_with_block_patterns_only():
    with pytest.raises(DimapError, match="applies to pattern 'block' only"):
        as_pattern("channel", 32)  # version 0.1 tolerated its default here: a wrong pair, now refused
    assert as_pattern("block", 16) == Pattern.block(16) and as_pattern("block", None) == Pattern.block(32)
    assert as_pattern("block16", 16) == Pattern.block(16)


@pytest.mark.parametrize("value,old", [
    (Pattern.unstructured(), dict(pattern="unstructured")),
    (Pattern.block(16), dict(pattern="block", block_size=16)),
    (Pattern.channel(), dict(pattern="channel")),
    (Pattern.nm(2, 4), dict(pattern="2:4")),
])
def test_value_and_old_strings_give_the_same_masks(value, old):
    model = small_swin(1)
    ratio = 0.5 if value.kind == "n:m" else 0.4
    new = dimap_fast.compute_masks(model, ratio, method=Method.DIMAP, pattern=value)
    before = dimap_fast.compute_masks(model, ratio, method="dimap", **old)
    assert new.keys() == before.keys() and all(torch.equal(new[k], before[k]) for k in new)
    assert sum(int((~m).sum()) for m in new.values()) > 0
    p = dimap_fast.plan(model, pattern=value, method="uniform")
    assert p.pattern == value and p.method is Method.UNIFORM and p.block_size == value.block_size
    assert repr(p).startswith(f"Plan(method='uniform', pattern='{value}'")


def test_tile_sizes_have_one_home():
    from dimap_fast.kernels.sparse_linear import TILE_SIZES as KERNEL_TILE_SIZES

    assert TILE_SIZES is KERNEL_TILE_SIZES == (16, 32, 64)
