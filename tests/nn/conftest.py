import pytest


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each kernel a drop-in's fast path runs, so a test knows they ran (not
    timm's code): the fused window attention's autograd Function, the block-sparse linear."""
    import dimap_fast.kernels as k

    calls = {"window_attention": 0, "block_sparse_linear": 0}

    def counting(name, real):
        def counted(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return counted

    monkeypatch.setattr(k.FusedWindowAttention, "apply",
                        counting("window_attention", k.FusedWindowAttention.apply))
    monkeypatch.setattr(k, "block_sparse_linear",
                        counting("block_sparse_linear", k.block_sparse_linear))
    return calls
