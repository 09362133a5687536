"""The dense SwiGLU FFN: ``down(silu(gate) * up)`` from the fused ``[gate | up]`` projection, with the
activation's hand-written backward checked against autograd of the formula written out here."""
from __future__ import annotations

import pytest
import torch

from zoo.kernels.swiglu import swiglu
from zoo.model import SwiGLU


def ref_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up[..., : gate_up.shape[-1] // 2], gate_up[..., gate_up.shape[-1] // 2:]
    return gate * torch.sigmoid(gate) * up


def test_swiglu_activation_and_its_gradient_match_the_formula():
    gen = torch.Generator().manual_seed(0)
    gate_up = (3 * torch.randn(2, 5, 24, generator=gen, dtype=torch.float64)).requires_grad_()
    dh = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    ref_in = gate_up.detach().clone().requires_grad_()
    got, want = swiglu(gate_up), ref_swiglu(ref_in)
    got.backward(dh)
    want.backward(dh)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gate_up.grad, ref_in.grad, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(swiglu, (ref_in.detach()[:1, :2].clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_module_keeps_its_dtype_and_matches_the_formula(dtype):
    torch.manual_seed(1)
    ffn = SwiGLU(16, 24).to(dtype)
    x = torch.randn(3, 4, 16).to(dtype).requires_grad_()
    y = ffn(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == ffn.gate_up.weight.grad.dtype == dtype
    ref = ref_swiglu(x.double() @ ffn.gate_up.weight.double().t()) @ ffn.down.weight.double().t()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
