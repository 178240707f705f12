"""The CPU output-buffer cache: large outputs reuse freed buffers, results stay correct,
the cap is honoured, and two threads can use it at once."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from resnet_fast.ops import add_relu, cpu_cache_bytes, empty_cpu_cache, scale_shift_act


def _big(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 64, 32, 32, generator=g), torch.randn(4, 64, 32, 32, generator=g)  # 1 MiB each


def test_freed_outputs_are_reused_and_fully_overwritten():
    empty_cpu_cache()
    x, r = _big()
    out = add_relu(x, r, backend="cpu")
    ptr = out.data_ptr()
    assert cpu_cache_bytes() == 0
    del out
    assert cpu_cache_bytes() >= x.numel() * 4
    x2, r2 = _big(seed=1)
    again = add_relu(x2, r2, backend="cpu")
    assert again.data_ptr() == ptr  # the same buffer, no fresh pages
    assert torch.equal(again, torch.relu(x2 + r2))
    assert cpu_cache_bytes() == 0
    # Shared by both ops: a scale_shift_act output of the same size takes it too.
    del again
    s, b = torch.ones(64), torch.zeros(64)
    out = scale_shift_act(x, s, b, None, False, backend="cpu")
    assert out.data_ptr() == ptr and torch.equal(out, x)
    del out
    assert empty_cpu_cache() >= x.numel() * 4
    assert cpu_cache_bytes() == 0


def test_small_outputs_use_the_default_allocator():
    empty_cpu_cache()
    x = torch.randn(2, 3, 4, 4)
    out = add_relu(x, x, backend="cpu")
    del out
    assert cpu_cache_bytes() == 0


def test_outputs_behave_like_ordinary_tensors():
    x, r = _big()
    out = add_relu(x, r, backend="cpu")
    out.add_(1)  # writable
    assert out.is_contiguous()
    view = out[1:3]
    del out
    assert view.sum().item() > 0  # a view keeps the buffer alive
    cl = add_relu(x.contiguous(memory_format=torch.channels_last), r, backend="cpu")
    assert cl.is_contiguous(memory_format=torch.channels_last)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.slow
def test_cap_from_the_environment():
    code = ("import torch, resnet_fast.ops as o; x = torch.randn(4, 64, 32, 32); "
            "y = o.add_relu(x, x, backend='cpu'); del y; print(o.cpu_cache_bytes())")
    assert _run(code, RESNET_FAST_CPU_CACHE_MB="0").stdout.strip() == "0"
    assert int(_run(code, RESNET_FAST_CPU_CACHE_MB="64").stdout.strip()) > 0
    for value in ("lots", "1e3", "512MB", "-"):
        bad = _run(code, RESNET_FAST_CPU_CACHE_MB=value)
        assert bad.returncode != 0, value
        assert (f"RESNET_FAST_CPU_CACHE_MB must be a whole number of megabytes, got '{value}'"
                in bad.stderr)


def test_two_threads_at_once():
    def work(seed):
        wrong = []
        for i in range(30):
            x, r = _big(seed * 100 + i)
            if not torch.equal(add_relu(x, r, backend="cpu"), torch.relu(x + r)):
                wrong.append(f"thread {seed} iteration {i}")
        return wrong

    with ThreadPoolExecutor(2) as pool:  # exceptions in a thread re-raise here
        assert [w for wrong in pool.map(work, range(2)) for w in wrong] == []


def test_conv_both_sides_of_the_cache_threshold():
    """conv_bias_act on CPU float32: oneDNN allocates its output, from the cache at 1 MiB or
    more (the cache standing in for the CPU allocator during the call) and from the default
    allocator below; both give the reference's result, with and without a residual (a
    binary-add post-op), ReLU or not, keeping a NaN of the residual."""
    from resnet_fast.ops import conv_bias_act, reference

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, 3, 3, generator=g) / 17
    b = torch.randn(64, generator=g)
    for batch in (1, 4):  # output 256 KiB / 1 MiB
        x = torch.randn(batch, 32, 32, 32, generator=g).contiguous(
            memory_format=torch.channels_last)
        r = torch.randn(batch, 64, 32, 32, generator=g).contiguous(
            memory_format=torch.channels_last)
        r[0, 5, 2, 3] = float("nan")
        for residual, relu in ((r, True), (r, False), (None, True), (None, False)):
            empty_cpu_cache()
            out = conv_bias_act(x, w, b, 1, 1, 1, 1, residual, relu, backend="cpu")
            ref = reference.conv_bias_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, residual, relu)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, equal_nan=True)
            assert torch.isnan(out).any() == (residual is not None)
            del out
            assert (cpu_cache_bytes() > 0) == (batch == 4)


def _conv_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(64, 32, 3, 3, generator=g) / 17, torch.randn(64, generator=g)


def test_the_cpu_allocator_is_the_default_again_after_a_conv():
    """Only oneDNN's own allocations inside the op come from the cache: a large tensor made
    after the call (or on another thread between calls) is the default allocator's, so freeing
    it adds nothing to the cache."""
    from resnet_fast.ops import conv_bias_act

    x, w, b = _conv_args()
    out = conv_bias_act(x, w, b, 1, 1, 1, 1, None, True, backend="cpu")
    empty_cpu_cache()
    big = torch.empty(8 * 2**20 // 4)
    big.fill_(1.0)
    del big
    assert cpu_cache_bytes() == 0
    del out
    assert cpu_cache_bytes() >= 4 * 64 * 32 * 32 * 4  # the conv's output went back to it


def test_convs_on_two_threads_with_allocations_beside_them():
    """Two threads run conv_bias_act (each swapping the cache in as the CPU allocator for its
    call, the scopes overlapping) while a third allocates and checks ordinary tensors: every
    result is right, and afterwards the default allocator is back."""
    from resnet_fast.ops import conv_bias_act, reference

    def convs(seed):
        x, w, b = _conv_args(seed)
        ref = reference.conv_bias_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, None, True)
        return sum(not torch.allclose(conv_bias_act(x, w, b, 1, 1, 1, 1, None, True,
                                                    backend="cpu"), ref, rtol=1e-4, atol=1e-4)
                   for _ in range(20))

    def tensors(seed):
        wrong = 0
        for i in range(200):
            t = torch.full((2**19,), float(i))  # 2 MiB
            wrong += int(t.sum().item() != i * 2**19)
        return wrong

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda f: f[0](f[1]), [(convs, 0), (convs, 1), (tensors, 2)])) == [
            0, 0, 0]
    empty_cpu_cache()
    big = torch.empty(8 * 2**20 // 4)
    del big
    assert cpu_cache_bytes() == 0


def _sized(mib: float, seed=0):
    """(x, r) for an add_relu output of about ``mib`` MiB."""
    n = int(mib * 2**20 / 4 / (64 * 32 * 32))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, 32, 32, generator=g), torch.randn(n, 64, 32, 32, generator=g)


def test_a_smaller_output_reuses_a_slightly_larger_free_buffer():
    empty_cpu_cache()
    x, r = _sized(16)
    out = add_relu(x, r, backend="cpu")
    ptr = out.data_ptr()
    del out
    x2, r2 = _sized(13, seed=1)  # 14 MiB rounded, and 16 is within a quarter more of it
    again = add_relu(x2, r2, backend="cpu")
    assert again.data_ptr() == ptr
    assert torch.equal(again, torch.relu(x2 + r2))
    del again
    x3, r3 = _sized(2, seed=2)  # far smaller: a buffer of its own, the 16 MiB one stays cached
    small = add_relu(x3, r3, backend="cpu")
    assert small.data_ptr() != ptr and cpu_cache_bytes() >= 16 * 2**20
    del small
    empty_cpu_cache()


@pytest.mark.slow
def test_at_the_cap_the_least_recently_freed_buffers_go_first():
    # A cap of 16 MiB; buffers of 4, 6 and 8 MiB freed in that order, then 8 MiB more: the 4
    # and 6 MiB ones (freed first) are evicted, and the newest stay.
    code = """
import torch, resnet_fast.ops as o
def out(mib, seed):
    n = int(mib * 2**20 / 4 / (64 * 32 * 32))
    x = torch.randn(n, 64, 32, 32)
    return o.add_relu(x, x, backend='cpu')
a, b, c = out(4, 0), out(6, 1), out(8, 2)
del a, b, c
print(o.cpu_cache_bytes() >> 20)
d = out(10, 3)
del d
print(o.cpu_cache_bytes() >> 20)
"""
    got = _run(code, RESNET_FAST_CPU_CACHE_MB="16")
    assert got.returncode == 0, got.stderr
    # 4 + 6 fit; 8 more would pass 16, so the 4 goes (LRU): 6 + 8 = 14. Then 10: 6 goes too,
    # and 8 (freed after it) must also go to fit 10 under 16: 10 alone.
    assert got.stdout.split() == ["14", "10"]
