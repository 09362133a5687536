"""zoo.sdpa.causal_attention: causal attention on oneDNN GEMMs (fp32 CPU, several query blocks), checked
against attention written out here in fp64, and its fallback to SDPA everywhere else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.kernels.sdpa as sdpa
from zoo.kernels.gemm import CPU_MATMUL_ENV, cpu_matmul_libraries

needs_onednn = pytest.mark.skipif("onednn" not in cpu_matmul_libraries(), reason="this torch has no oneDNN matmul")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v in fp64, kv heads repeated for GQA."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def heads(B: int, T: int, H: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(B, H, T, d) as attention gets it: heads split off a (B, T, H*d) projection, transposed."""
    return torch.randn(B, T, H, d, generator=gen).transpose(1, 2).requires_grad_()


@needs_onednn
@pytest.mark.parametrize("B,H,H_kv,T,d", [(2, 4, 4, 100, 16), (1, 6, 2, 64, 8), (2, 4, 1, 33, 32)])
def test_onednn_path_matches_attention_written_out(B, H, H_kv, T, d, monkeypatch):
    monkeypatch.setattr(sdpa, "BLOCK", 16)  # several blocks, the last one partial for T = 100 and 33
    gen = torch.Generator().manual_seed(0)
    q, k, v = heads(B, T, H, d, gen), heads(B, T, H_kv, d, gen), heads(B, T, H_kv, d, gen)
    assert sdpa._on_onednn(q, k, v)
    calls = []
    monkeypatch.setattr(sdpa._CausalAttention, "apply", lambda *a, _apply=sdpa._CausalAttention.apply: calls.append(1) or _apply(*a))
    out = sdpa.causal_attention(q, k, v)
    assert calls, "the oneDNN path did not run"
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = reference(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), dout.double())
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp.float(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_second_backward_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(sdpa, "BLOCK", 8)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (heads(1, 20, 2, 8, gen) for _ in range(3))
    out = sdpa.causal_attention(q, k, v).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"causal_attention's backward ran twice \(retain_graph=True\)"):
        out.backward()


@pytest.mark.parametrize("case", ["one block", "bf16", "aten", "too many probabilities"])
def test_falls_back_to_sdpa(case, monkeypatch):
    monkeypatch.setattr(sdpa, "BLOCK", 16)
    T, dtype = (16, torch.float32) if case == "one block" else (40, torch.float32)
    if case == "bf16":
        dtype = torch.bfloat16
    if case == "aten":
        monkeypatch.setenv(CPU_MATMUL_ENV, "aten")
    if case == "too many probabilities":
        monkeypatch.setattr(sdpa, "SAVED_BYTES", 1000)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (heads(2, T, 2, 8, gen).detach().to(dtype).requires_grad_() for _ in range(3))
    assert not sdpa._on_onednn(q, k, v)
    monkeypatch.setattr(sdpa._CausalAttention, "apply", lambda *a: pytest.fail("took the oneDNN path"))
    out = sdpa.causal_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)


@needs_onednn
def test_without_gradients_the_probabilities_are_not_kept_or_budgeted(monkeypatch):
    monkeypatch.setattr(sdpa, "BLOCK", 8)
    monkeypatch.setattr(sdpa, "SAVED_BYTES", 1000)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (heads(1, 30, 2, 8, gen).detach() for _ in range(3))
    assert sdpa._on_onednn(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(sdpa.causal_attention(q, k, v), reference(q, k, v).float(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_model_loss_and_gradients_agree_on_both_attention_paths(monkeypatch):
    """A whole zoo model (mha plugin, RoPE, GQA) past one block: the oneDNN path against SDPA's."""
    monkeypatch.setattr(sdpa, "BLOCK", 16)
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-hybridnorm", {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                "vocab_size": 97, "max_seq_len": 64})
    tokens = torch.randint(0, 97, (2, 41))
    results = []
    for on in (True, False):
        if not on:
            monkeypatch.setattr(sdpa, "_on_onednn", lambda *a: False)
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
