"""FLOPs: torch's flop counter, halved to multiply-adds, with our correction for zeroed weights.

Counts are checked against hand counts (Swin, an MLP, a CNN, an attention through SDPA), against
the hook-based count of version 0.1 for Swin-T, and between the meta pass and a real pass.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import dimap_fast
from dimap_fast.engine.flops import count_workload, count_flops, workload

CONFIG = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def small_swin(seed=0):
    torch.manual_seed(seed)
    return timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()


def swin_by_hand(img_size, patch_size, window_size, embed_dim, depths, num_heads, num_classes, in_chans=3) -> int:
    """Multiply-adds of a Swin, layer by layer: convolution, Linears, and q @ k^T plus attn @ v."""
    side, dim = img_size // patch_size, embed_dim
    total = side * side * dim * in_chans * patch_size * patch_size  # the patch embedding
    for stage, depth in enumerate(depths):
        if stage:  # patch merging: 4C -> 2C on a quarter of the tokens
            side //= 2
            total += side * side * 4 * dim * 2 * dim
            dim *= 2
        tokens, window = side * side, min(window_size, side)
        for _ in range(depth):
            total += tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
            total += 2 * (tokens // window**2) * window**4 * dim  # pairs per window x width, two matmuls
    return total + dim * num_classes


def test_small_swin_matches_the_hand_count():
    expected = swin_by_hand(**CONFIG)
    assert count_flops(small_swin(), (1, 3, 32, 32)) == (expected, expected)
    assert dimap_fast.report(small_swin())["flops"]["dense"] == expected


def test_counts_are_the_same_inside_inference_mode():
    # inside torch.inference_mode a dispatch mode sees no op: the pass must leave it
    expected = swin_by_hand(**CONFIG)
    with torch.inference_mode():
        model = small_swin()
        assert count_flops(model, (1, 3, 32, 32)) == (expected, expected)
        assert dimap_fast.plan(model).flops_reduction(0.5) > 0.3


def test_swin_tiny_matches_the_count_of_version_0_1():
    # 0.1 hooked every Linear and Conv2d and matched the attention by class name; it gave 4,490,566,656
    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    expected = swin_by_hand(224, 4, 7, 96, (2, 2, 6, 2), (3, 6, 12, 24), 1000)
    assert expected == 4_490_566_656
    assert count_flops(model, (1, 3, 224, 224)) == (expected, expected)


def test_meta_pass_reuses_shapes_and_counts_the_same(monkeypatch):
    # Blocks of a stage repeat their shapes: the meta pass runs each distinct op call once and
    # only allocates the outputs of the repeats; every count must equal the pass that runs them all.
    from dimap_fast.engine import flops

    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    reused = count_workload(model, (1, 3, 224, 224), meta=True)
    runs = []
    plain = flops._Counter._meta_call

    def every_call(self, func, args, kwargs):
        runs.append(func)
        return func(*args, **kwargs)

    monkeypatch.setattr(flops._Counter, "_meta_call", every_call)
    assert count_workload(model, (1, 3, 224, 224), meta=True) == reused
    monkeypatch.setattr(flops._Counter, "_meta_call", plain)
    counter = flops._Counter({}, meta=True)
    with counter:
        torch.func.functional_call(model, {k: torch.empty_like(v, device="meta") for k, v in
                                           [*model.named_parameters(), *model.named_buffers()]},
                                   (torch.empty(1, 3, 224, 224, device="meta"),))
    assert 0 < len(counter.shapes) < len(runs) / 2  # most calls were repeats


def test_hugging_face_swin_counts_like_timm():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=32, patch_size=2, window_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], num_labels=10)
    torch.manual_seed(0)
    hf = SwinForImageClassification(config).eval()
    expected = swin_by_hand(**CONFIG)
    assert count_flops(hf, (1, 3, 32, 32))[0] == expected
    assert dimap_fast.report(hf)["flops"]["dense"] == expected  # the input size is read from its config


def test_mlp_and_cnn_against_a_hand_count():
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    work = workload(mlp, torch.zeros(4, 64))
    assert work.total == 4 * 64 * 128 + 4 * 128 * 10
    assert work.positions == {"0": 4, "2": 4}
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    work = workload(cnn, (2, 3, 16, 16))
    assert work.positions == {"0": 2 * 16 * 16, "2": 2 * 8 * 8, "5": 2}
    assert work.total == 2 * 16 * 16 * 8 * 3 * 9 + 2 * 8 * 8 * 16 * 4 * 9 + 2 * 16 * 5
    assert work.modules[""] == work.total  # the root holds everything


class SDPABlock(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_sdpa_is_counted_on_the_meta_device_and_on_a_real_cpu():
    # a real CPU pass takes SDPA's CPU flash kernel, which torch's counter does not list: we add it
    model = SDPABlock().eval()
    linears = 2 * 10 * 32 * 96 + 2 * 10 * 32 * 32
    attention = 2 * (2 * 10 * 10) * 32  # two matmuls over (batch x query x key) pairs, 32 wide
    for meta in (True, False):
        work = count_workload(model, (2, 10, 32), meta=meta)
        assert work.total == linears + attention
        assert work.modules[""] - work.positions["qkv"] * 32 * 96 - work.positions["proj"] * 32 * 32 == attention


def test_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = timm.models.swin_transformer.SwinTransformer(**CONFIG).eval()
    assert next(model.parameters()).is_meta
    assert workload(model, (1, 3, 32, 32)).total == swin_by_hand(**CONFIG)


def test_zeroed_prunable_weights_leave_the_pruned_count_exactly():
    model = small_swin(1)
    dense = dimap_fast.report(model)["flops"]["dense"]
    with torch.no_grad():
        model.layers[0].blocks[0].mlp.fc1.weight.view(-1)[:100] = 0  # stage 0 runs 256 tokens
        model.layers[1].blocks[1].attn.qkv.weight.view(-1)[:30] = 0  # stage 1 runs 64 tokens
        model.head.fc.weight.view(-1)[:7] = 0  # not prunable: not pruning
        model.layers[0].blocks[0].mlp.fc1.bias.zero_()  # not a weight: not pruning
    flops = dimap_fast.report(model)["flops"]
    assert flops["dense"] == dense
    assert flops["pruned"] == dense - 100 * 256 - 30 * 64
    assert flops["reduction"] == 1 - flops["pruned"] / dense


def test_zeroed_weights_of_a_user_module_map():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    with torch.no_grad():
        mlp[0].weight.view(-1)[:50] = 0
        mlp[2].weight.view(-1)[:3] = 0
    rep = dimap_fast.report(mlp, module_map={"MLP-M": ("0.weight",)}, example_input=torch.zeros(4, 64))
    dense = 4 * 64 * 128 + 4 * 128 * 10
    assert rep["flops"]["dense"] == dense and rep["flops"]["pruned"] == dense - 4 * 50  # layer 2 is not in the map


def test_an_input_the_model_cannot_take_is_one_line():
    mlp = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(dimap_fast.DimapError, match=r"^cannot run the model on an input of shape \(1, 3, 224, 224\): .*pass input_size="):
        count_flops(mlp, (1, 3, 224, 224))
