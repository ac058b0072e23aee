import os
import sys

import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for tests/reference.py

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def swin_tiny_state():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224").state_dict()
