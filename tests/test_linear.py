"""zoo.linear: bf16/fp16 GEMMs in fp32 on CPUs without reduced-precision units, with the model
dtype's inputs, outputs and gradients; plain F.linear everywhere else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.kernels.gemm import CPU_MATMUL_ENV, compute_dtype, cpu_matmul, cpu_matmul_libraries, weight_grad
from zoo.kernels.linear import Linear, linear


def _operands(dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(8, 16, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(8, generator=gen).to(dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_reduced_precision_matches_its_definition(dtype, bias, monkeypatch):
    monkeypatch.setenv(CPU_MATMUL_ENV, "aten")  # the fp32 GEMMs bit for bit as F.linear's (oneDNN's: tested below)
    x, w, b = _operands(dtype, bias)
    dy = torch.randn(3, 5, 8).to(dtype)
    y = linear(x, w, b)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    if compute_dtype(x) == torch.float32:  # this CPU lacks the units: exact fp32 products, fp32 accumulation
        ref = F.linear(*(t.float() for t in leaves))
        ref.backward(dy.float())
        torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=0)
        for got, want in zip((x.grad, w.grad) + ((b.grad,) if bias else ()), leaves):
            torch.testing.assert_close(got, want.grad.to(dtype), rtol=0, atol=0)
    else:  # native units: exactly F.linear
        ref = F.linear(*leaves)
        ref.backward(dy)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    native = F.linear(*(t.detach() for t in (x, w, b) if t is not None))
    torch.testing.assert_close(y.float(), native.float(), rtol=2e-2, atol=2e-2)  # a bf16 GEMM's rounding


def test_module_keeps_nn_linear_state():
    x, _, _ = _operands(torch.float32, True)
    layer = Linear(16, 8)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_features", [40, 160], ids=["narrower-output", "wider-output"])
@pytest.mark.parametrize("library", ["onednn", "aten"])
def test_fp32_cpu_linear_matches_fp64_on_either_library(library, out_features, monkeypatch):
    """fp32 GEMMs through oneDNN (the default where torch has it) or aten's mm: output and all three
    gradients within fp32 rounding of an fp64 reference; ``aten`` is exactly ``F.linear``. Both widths
    of output, as the weight gradient is computed the other way round when the output is the wider."""
    if library not in cpu_matmul_libraries():
        pytest.skip(f"this torch has no {library} matmul")
    monkeypatch.setenv(CPU_MATMUL_ENV, library)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 70, 96, generator=gen).requires_grad_()
    w = torch.randn(out_features, 96, generator=gen).requires_grad_()
    b = torch.randn(out_features, generator=gen).requires_grad_()
    dy = torch.randn(3, 70, out_features, generator=gen)
    y = linear(x, w, b)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.linear(*leaves)
    ref.backward(dy.double())
    assert y.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    for got, want in zip((y, x.grad, w.grad, b.grad), (ref, *(t.grad for t in leaves))):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())
    if library == "aten":
        assert torch.equal(y, F.linear(x, w, b))


@pytest.mark.parametrize("shape", [(300, 24, 80), (300, 80, 24)], ids=["wider-output", "narrower-output"])
@pytest.mark.parametrize("library", ["onednn", "aten"])
def test_weight_grad_is_dy_transposed_times_x(library, shape):
    if library not in cpu_matmul_libraries():
        pytest.skip(f"this torch has no {library} matmul")
    n, k, out = shape
    gen = torch.Generator().manual_seed(3)
    dy, x = torch.randn(n, out, generator=gen), torch.randn(n, k, generator=gen)
    got = weight_grad(dy, x, torch.empty(out, k), library=library)
    want = dy.double().t() @ x.double()
    assert got.shape == (out, k) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_autocast_and_other_devices_get_plain_f_linear():
    x, w, b = _operands(torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w, b).dtype == torch.bfloat16  # autocast's bf16 GEMM, as F.linear gives it


def test_cpu_matmul_setting_is_checked(monkeypatch):
    monkeypatch.setenv(CPU_MATMUL_ENV, "mkl")
    with pytest.raises(ConfigError, match=r"ZOO_CPU_MATMUL='mkl': use onednn, aten or leave it unset"):
        cpu_matmul()
    monkeypatch.setenv(CPU_MATMUL_ENV, "")
    assert cpu_matmul() == ("onednn" if "onednn" in cpu_matmul_libraries() else "aten")
