"""Any model with a user module map (the generic adapter): unstructured and block pruning work,
against literal references; the channel pattern and shrink are refused with what is missing.
Also: how an adapter is found, named, and what its module map claims."""

import math

import pytest
import torch
from reference import reference_masks

import dimap_fast
from dimap_fast import DimapError
from dimap_fast.arch import ADAPTERS, find_adapter
from dimap_fast.shrink import shrink

MAP = {"IN": ["*.inp.weight"], "HID": ["*.hidden.weight", "*.out.weight"]}


class SmallMLP(torch.nn.Module):
    """Weights whose sides are not multiples of 16 or 64: every tile grid has partial edge tiles."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.ModuleDict({"inp": torch.nn.Linear(70, 100), "hidden": torch.nn.Linear(100, 130),
                                         "out": torch.nn.Linear(130, 9)})

    def forward(self, x):
        return self.body["out"](torch.relu(self.body["hidden"](torch.relu(self.body["inp"](x)))))


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return SmallMLP()


def test_generic_adapter_is_found_from_the_module_map():
    model = small_mlp()
    assert find_adapter(model, module_map=MAP).name == "generic"
    assert find_adapter(model, arch="generic", module_map=MAP).module_map == {m: tuple(g) for m, g in MAP.items()}
    with pytest.raises(DimapError, match="arch='generic' needs module_map"):
        find_adapter(model, arch="generic")
    with pytest.raises(DimapError, match="unknown arch 'vit'"):
        find_adapter(model, arch="vit")


@pytest.mark.parametrize("method", ["dimap", "global", "uniform"])
def test_unstructured_equals_the_reference(method):
    model = small_mlp(1)
    state = model.state_dict()
    for ratio in (0.2, 0.5, 0.85):
        masks = dimap_fast.compute_masks(model, ratio, method=method, module_map=MAP)
        expect = reference_masks(state, ratio, method, MAP)
        assert masks.keys() == expect.keys() == {"body.inp.weight", "body.hidden.weight", "body.out.weight"}
        for name in expect:
            assert torch.equal(masks[name], expect[name]), name


def literal_tile_masks(weights, ratio, b):
    """Tiles of every weight (row-major, edge tiles cut short), one Eq. 10 ranking per module."""
    keys, tiles = [], {}
    for li, (name, w) in enumerate(weights):
        rows, cols = w.shape
        energy = []
        for i in range(0, rows, b):
            for j in range(0, cols, b):
                energy.append((float((w[i:i + b, j:j + b].double() ** 2).sum()), i, j))
        tiles[name] = energy
        order = sorted(range(len(energy)), key=lambda t: (-energy[t][0], t))
        total = 0.0
        for rank, t in enumerate(order):
            total += energy[t][0]
            keys.append((energy[t][0] / total if total > 0 else 0.0, li, rank, name, t))
    keys.sort(key=lambda k: (-k[0], k[1], k[2]))
    keep = keys[: len(keys) - int(math.floor(ratio * len(keys) + 0.5))]
    masks = {name: torch.zeros(w.shape, dtype=torch.bool) for name, w in weights}
    for _, _, _, name, t in keep:
        _, i, j = tiles[name][t]
        masks[name][i:i + b, j:j + b] = True
    return masks


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_block_tiles_with_partial_edges_equal_the_literal_tiles(block, ratio):
    model = small_mlp(2)
    params = dict(model.named_parameters())
    masks = dimap_fast.compute_masks(model, ratio, pattern="block", block_size=block, module_map=MAP)
    for module, globs in MAP.items():
        names = sorted(n for n in masks if any(n.endswith(g.lstrip("*")) for g in globs))
        expect = literal_tile_masks([(n, params[n].detach()) for n in names], ratio, block)
        for n in names:
            assert torch.equal(masks[n], expect[n]), (n, module)
    # the edge tiles really are partial, and some of them were pruned
    assert any(w.shape[0] % block or w.shape[1] % block for w in params.values() if w.dim() == 2)
    assert not all(bool(m.all()) for m in masks.values())


def test_channel_and_shrink_are_refused_with_what_is_missing():
    model = small_mlp(3)
    with pytest.raises(DimapError, match="neuron and head groups.*'generic'.*pattern 'unstructured' or 'block'"):
        dimap_fast.plan(model, pattern="channel", module_map=MAP)
    with pytest.raises(DimapError, match="shrink needs the model's neuron and head groups.*'generic'"):
        shrink(model, arch=find_adapter(model, module_map=MAP))


def test_family_module_maps_claim_exactly_the_block_linears():
    """HF Swinv2's block output.dense is MLP-M, its attention.output.dense PRJ-M: globs must not mix them."""
    hf = ADAPTERS["hf-swinv2"]()
    block = "swinv2.encoder.layers.3.blocks.17"
    assert hf.module_of(f"{block}.output.dense.weight") == "MLP-M"
    assert hf.module_of(f"{block}.attention.output.dense.weight") == "PRJ-M"
    assert hf.module_of(f"{block}.attention.self.key.weight") == "QKV-M"
    assert hf.module_of(f"{block}.attention.self.logit_scale") is None
    assert hf.module_of("swinv2.encoder.layers.0.downsample.reduction.weight") is None
    timm = ADAPTERS["timm-swin"]()
    assert timm.module_of("layers.0.blocks.1.attn.qkv.weight") == "QKV-M"
    assert timm.module_of("layers.0.blocks.1.attn.relative_position_bias_table") is None
    names = {"layers.0.blocks.0.attn.qkv.weight": 0, "layers.0.blocks.0.attn.logit_scale": 0}
    assert find_adapter(names).name == "timm-swinv2"
    assert find_adapter({"swin.encoder.layers.0.blocks.0.attention.q_proj.weight": 0}).name == "hf-swin"


def test_channel_refuses_a_map_that_splits_a_group():
    """A neuron is fc1's row and fc2's column together: a map holding fc1 alone cannot prune neurons."""
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1,), num_heads=(2,),
                            num_classes=10)
    assert find_adapter(model, module_map={"M": ["*.mlp.fc1.weight"]}).name == "timm-swin"
    with pytest.raises(DimapError, match="layers.0.blocks.0.mlp.fc1.weight is not in one whose weights are all prunable"):
        dimap_fast.plan(model, pattern="channel", module_map={"M": ["*.mlp.fc1.weight"]})
    masks = dimap_fast.compute_masks(model, 0.5, pattern="channel", module_map={"M": ["*.mlp.fc*.weight"]})
    assert set(masks) == {"layers.0.blocks.0.mlp.fc1.weight", "layers.0.blocks.0.mlp.fc2.weight"}
