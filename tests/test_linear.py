"""zoo.linear: bf16/fp16 GEMMs in fp32 on CPUs without reduced-precision units, with the model
dtype's inputs, outputs and gradients; plain F.linear everywhere else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.linear import Linear, compute_dtype, linear


def _operands(dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(8, 16, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(8, generator=gen).to(dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_reduced_precision_matches_its_definition(dtype, bias):
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


def test_fp32_is_plain_f_linear_and_module_keeps_nn_linear_state():
    x, w, b = _operands(torch.float32, True)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    layer = Linear(16, 8)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
