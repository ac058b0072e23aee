import os

import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
# On a CUDA host the same tests run the compiled kernels on the GPU (see the `device` fixture).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: runs a Triton kernel, the Triton plan or a dimap_fast.nn fast path "
                   "(on CUDA when present, under the interpreter otherwise); `pytest -m gpu` is "
                   "the GPU subset")


def pytest_collection_modifyitems(config, items):
    # Every test that asks for the device fixture exercises the Triton code path: that is the
    # GPU subset, so it cannot drift from what the tests actually do.
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def device():
    """Where the Triton kernels run: CUDA when a GPU is present, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture(scope="session")
def swin_tiny_state():
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224").state_dict()
