"""nn's registry of drop-ins: which class each family's timm class becomes, and what a shrunk
SwinV2 attention needs."""

import torch
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_v2

import dimap_fast
from dimap_fast.nn.drop_ins import drop_ins_for
from dimap_fast.nn.swin_block import SwinBlock
from dimap_fast.nn.swinv2 import SwinV2Block, WindowAttentionV2


def test_each_family_names_its_drop_ins():
    assert drop_ins_for("timm-swin")[timm_swin.SwinTransformerBlock] is SwinBlock
    assert drop_ins_for("timm-swinv2")[timm_v2.SwinTransformerV2Block] is SwinV2Block
    assert drop_ins_for("hf-swin") == {} and drop_ins_for("generic") == {}


@torch.no_grad()
def test_shrunk_swinv2_attention_gets_its_drop_in():
    model = timm_v2.SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1,),
                                      num_heads=(2,), num_classes=3).eval()
    attn = model.layers[0].blocks[0].attn
    hd = attn.proj.in_features // attn.num_heads
    attn.proj.weight[:, :hd] = 0  # the first head adds nothing
    x = torch.randn(1, 3, 32, 32)
    want = model(x)
    dimap_fast.shrink(model)
    assert type(attn) is WindowAttentionV2 and attn.num_heads == 1
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
