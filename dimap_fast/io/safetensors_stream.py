"""Write a pruned model's safetensors file one tensor at a time.

safetensors' own ``save`` builds the whole file in memory, and a pruned state dict is a second
copy of the weights: with both, writing a pruned Swin-L took over three times its weights beside
the model. Here each weight is pruned (w * mask) just before its bytes are written, so at most
one pruned tensor exists at a time. The format is safetensors': a little-endian u64 header
length, the JSON header padded with spaces to 8 bytes, then the data, laid out widest dtype
first and by name inside a dtype; loaders read it with safetensors as any other file.
"""

from __future__ import annotations

from typing import Callable

import torch

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
          torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_pruned(path, state_dict: dict, masks: dict, metadata: dict[str, str], mask_prefix: str,
                 first_write: Callable[[str, bytes], None]) -> None:
    """The state dict's tensors (masked ones as w * mask) and every mask as ``mask_prefix + name``.

    ``first_write(path, data)`` creates the file with the header; the data is appended after it.
    """
    # A mask that does not fit its weight is written as it is, for load_pruned to refuse.
    produce = {name: (lambda w=w, m=masks.get(name): w if m is None or m.shape != w.shape else w * m.to(w.device))
               for name, w in state_dict.items()}
    produce.update({mask_prefix + name: (lambda m=m: m.to(torch.bool)) for name, m in masks.items()})
    specs = {name: (w.dtype, tuple(w.shape)) for name, w in state_dict.items()}
    specs.update({mask_prefix + name: (torch.bool, tuple(m.shape)) for name, m in masks.items()})
    order = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header, start = {}, 0
    for name in order:
        dtype, shape = specs[name]
        if dtype not in _NAMES:
            raise ValueError(f"{name}: safetensors has no {dtype}")
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    header["__metadata__"] = dict(sorted(metadata.items()))
    import json

    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    first_write(path, len(text).to_bytes(8, "little") + text)
    with open(path, "ab") as f:
        for name in order:
            t = produce[name]().detach().cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
