"""How close a kernel's float output must be to its float32 reference, stated once.

Keyed by dtype, and for float32 by the precision of the kernel's dot products, which follows
``torch.get_float32_matmul_precision()`` as F.linear does: "highest" runs them in ieee float32,
"high"/"medium" in tf32 (10-bit mantissa). (atol, rtol) for outputs of magnitude about one.
The interpreter computes every dot in float32, so these hold there with room to spare; they are
sized for the GPU.
"""

import contextlib

import torch

TOLERANCES = {
    "ieee": (1e-4, 1e-5),
    "tf32": (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
FP32_PRECISIONS = ("ieee", "tf32")


def fp32_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for a kernel output of ``dtype`` under the current fp32 matmul precision."""
    return TOLERANCES[fp32_precision() if dtype == torch.float32 else dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` (any device, the kernel's dtype) against a float32/float64 reference."""
    atol, rtol = tolerance(got.dtype)
    assert torch.isfinite(got).all(), "non-finite output"
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=rtol)


# ||got - want|| / ||want|| for gradients, which sum many products: a norm-wise bound is the
# meaningful one where single entries near zero carry no relative precision.
REL_TOLERANCES = {"ieee": 5e-5, "tf32": 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what="") -> None:
    """Norm-wise relative error of ``got`` against a float32 reference, for ``dtype`` inputs."""
    assert got is not None and want is not None, f"{what}: a gradient is missing"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    bound = REL_TOLERANCES[fp32_precision() if dtype == torch.float32 else dtype]
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err <= bound, f"{what}: relative error {err:.2e} > {bound:.0e}"


@contextlib.contextmanager
def matmul_precision(name: str):
    """Run float32 dots in ``name`` ("ieee" or "tf32") inside the block."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if name == "ieee" else "high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# (dtype, fp32 precision) cases: float32 under both precisions, the half types once.
DTYPE_CASES = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"),
               (torch.bfloat16, "ieee")]
DTYPE_IDS = ["fp32-ieee", "fp32-tf32", "fp16", "bf16"]
