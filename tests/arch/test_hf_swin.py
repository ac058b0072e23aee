"""Hugging Face Swin and Swinv2, built from a small config (no download): exact masks against the
literal reference, channel groups against a literal head/neuron sum, shrink with equal logits."""

import copy

import pytest
import torch
from reference import literal_unit_keep, reference_masks

import dimap_fast
from dimap_fast.arch import find_adapter
from dimap_fast.shrink import block_sizes, resize, shrink

transformers = pytest.importorskip("transformers")

SMALL = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)

# literal globs, written here (not read from the adapter): q, k and v together form QKV-M
HF_SWIN = {"QKV-M": ["*.attention.q_proj.weight", "*.attention.k_proj.weight", "*.attention.v_proj.weight"],
           "PRJ-M": ["*.attention.o_proj.weight"], "MLP-M": ["*.mlp.fc1.weight", "*.mlp.fc2.weight"]}
HF_SWINV2 = {"QKV-M": ["*.attention.self.query.weight", "*.attention.self.key.weight", "*.attention.self.value.weight"],
             "PRJ-M": ["*.attention.output.dense.weight"],
             "MLP-M": ["*.intermediate.dense.weight", "*blocks.?.output.dense.weight"]}
SPELLING = {"hf-swin": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
            "hf-swinv2": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                          "intermediate.dense", "output.dense")}


def build(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "hf-swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(**SMALL))
    else:
        model = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**SMALL))
    with torch.no_grad():  # HF initializes biases, logit scales and bias tables to constants: make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1 or "logit_scale" in name or "relative_position_bias_table" in name:
                p.normal_(std=0.5)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind,patterns", [("hf-swin", HF_SWIN), ("hf-swinv2", HF_SWINV2)])
@pytest.mark.parametrize("method", ["dimap", "global"])
def test_unstructured_masks_equal_the_reference(kind, patterns, method):
    model = build(kind)
    state = model.state_dict()
    assert find_adapter(model).name == kind and find_adapter(state).name == kind
    plan = dimap_fast.plan(model, method=method)
    assert len(plan.layers) == 2 * 2 * 6  # 4 blocks x (q, k, v, output, fc1, fc2)
    for ratio in (0.3, 0.5, 0.8):
        masks = plan.masks(ratio)
        expect = reference_masks(state, ratio, method, patterns)
        assert masks.keys() == expect.keys()
        for name in expect:
            assert torch.equal(masks[name], expect[name]), name


@pytest.mark.parametrize("kind", ["hf-swin", "hf-swinv2"])
def test_channel_masks_equal_literal_heads_and_neurons(kind):
    model = build(kind, seed=1)
    sd = model.state_dict()
    q, k, v, o, fc1, fc2 = SPELLING[kind]
    blocks = sorted({n.split(f".{q}.")[0] for n in sd if f".{q}.weight" in n})
    heads = dict(zip(blocks, [2, 2, 4, 4]))
    ratio = 0.5
    masks = dimap_fast.compute_masks(model, ratio, pattern="channel")
    neuron_e, head_e = [], []
    for b in blocks:
        w1, w2 = sd[f"{b}.{fc1}.weight"].double(), sd[f"{b}.{fc2}.weight"].double()
        b1 = sd[f"{b}.{fc1}.bias"].double()
        neuron_e.append([float((w1[i] ** 2).sum() + b1[i] ** 2 + (w2[:, i] ** 2).sum()) for i in range(w1.shape[0])])
        hd = sd[f"{b}.{q}.weight"].shape[0] // heads[b]
        e = []
        for h in range(heads[b]):
            rows = slice(h * hd, (h + 1) * hd)
            total = sum(float((sd[f"{b}.{p}.weight"][rows].double() ** 2).sum()) for p in (q, k, v))
            total += sum(float((sd[f"{b}.{p}.bias"][rows].double() ** 2).sum()) for p in (q, k, v) if f"{b}.{p}.bias" in sd)
            total += float((sd[f"{b}.{o}.weight"][:, rows].double() ** 2).sum())
            e.append(total)
        head_e.append(e)
    for b, keep in zip(blocks, literal_unit_keep(neuron_e, ratio, floor_one=True)):
        keep = torch.from_numpy(keep)
        assert torch.equal(masks[f"{b}.{fc1}.weight"], keep[:, None].expand_as(masks[f"{b}.{fc1}.weight"]))
        assert torch.equal(masks[f"{b}.{fc2}.weight"], keep[None, :].expand_as(masks[f"{b}.{fc2}.weight"]))
    for b, keep in zip(blocks, literal_unit_keep(head_e, ratio, floor_one=True)):
        cols = torch.from_numpy(keep).repeat_interleave(sd[f"{b}.{o}.weight"].shape[1] // len(keep))
        for p in (q, k, v):
            assert torch.equal(masks[f"{b}.{p}.weight"], cols[:, None].expand_as(masks[f"{b}.{p}.weight"]))
        assert torch.equal(masks[f"{b}.{o}.weight"], cols[None, :].expand_as(masks[f"{b}.{o}.weight"]))
    if kind == "hf-swinv2":
        assert f"{blocks[0]}.attention.self.key.bias" not in sd  # Swinv2's key has no bias


@pytest.mark.parametrize("kind", ["hf-swin", "hf-swinv2"])
def test_channel_pruned_then_shrunk_gives_equal_logits(kind):
    model = build(kind, seed=2)
    x = torch.randn(2, 3, 32, 32)
    dense = logits(model, x)
    dimap_fast.plan(model, pattern="channel").prune_(0.6)
    masked = logits(model, x)
    assert (masked - dense).abs().max() > 1e-3  # pruning changed the model
    small = shrink(copy.deepcopy(model))
    assert (logits(small, x) - masked).abs().max() < 1e-5
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(small) < 0.85 * params(model)
    sizes = block_sizes(small)
    assert len(sizes) == 4 and any(s["heads"] < h for s, h in zip(sizes.values(), [2, 2, 4, 4]))
    # a fresh model given the shrunk sizes loads the shrunk weights and gives the same logits
    fresh = type(model)(model.config).eval()
    resize(fresh, sizes)
    fresh.load_state_dict(small.state_dict())
    assert torch.equal(logits(fresh, x), logits(small, x))


def test_convert_considers_the_linears_of_a_family_without_drop_ins():
    # HF Swin has no drop-in attention: convert leaves its modules (no warning) and swaps the pruned Linears
    import warnings

    from dimap_fast import nn as dnn

    model = build("hf-swin", seed=3)
    for name, mod in model.named_modules():
        if name.endswith(SPELLING["hf-swin"]):
            dnn.zero_smallest_tiles_(mod.weight, 0.5, 16)
    x = torch.randn(2, 3, 32, 32)
    want = logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dnn.convert(model, choose="kernel", block=16)
    rows = {r.name: r.chosen for r in model.dimap_convert_report}
    # every block Linear is considered; a 16x16 one is a single tile, which the 50% rounds to none
    assert len(rows) == 4 * 6 and sum(c == "kernel" for c in rows.values()) == 4 * 6 - 8
    assert isinstance(model.swin.encoder.layers[1].blocks[0].attention.q_proj, dnn.SparseLinear)
    assert torch.equal(logits(model, x), want)
