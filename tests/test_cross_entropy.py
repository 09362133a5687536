"""zoo.cross_entropy: the same loss and gradient as F.cross_entropy on fp32-upcast logits, from fewer passes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.kernels.cross_entropy import cross_entropy


def _case(dtype: torch.dtype, ignore: bool = True):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 300, generator=gen) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (64,), generator=gen)
    if ignore:
        targets[::5] = -100
    return logits, targets


def _grads(fn, logits, targets):
    loss = fn(logits, targets)
    (grad,) = torch.autograd.grad(loss * 3.0, logits)  # an upstream gradient other than 1
    return loss.detach(), grad


def reference(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def test_fp32_value_and_gradient_match_f_cross_entropy():
    logits, targets = _case(torch.float32)
    (loss, grad), (want, want_grad) = _grads(cross_entropy, logits, targets), _grads(reference, logits, targets)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)
    assert grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_bf16_gradient_comes_back_in_bf16_rounded_like_the_upcast_path():
    logits, targets = _case(torch.bfloat16)
    (loss, grad), (want, want_grad) = _grads(cross_entropy, logits, targets), _grads(reference, logits, targets)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2 ** -7, atol=1e-9)  # one bf16 rounding apart at most
    assert (grad != want_grad).float().mean() < 0.01


def test_an_underflowed_target_probability_still_gives_the_exact_loss():
    logits, targets = _case(torch.float32, ignore=False)
    with torch.no_grad():
        logits[3, targets[3]] = -1e4  # softmax gives exactly 0 there; log-softmax does not
    loss, want = cross_entropy(logits, targets), reference(logits, targets)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


def test_all_targets_ignored_is_nan_as_in_torch():
    logits, targets = _case(torch.float32)
    targets[:] = -100
    assert math.isnan(cross_entropy(logits, targets).item()) and math.isnan(reference(logits, targets).item())


def test_other_shapes_are_f_cross_entropy():
    logits = torch.randn(2, 7, 5)  # (N, C, d): torch's class dimension second
    targets = torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets), rtol=0, atol=0)
