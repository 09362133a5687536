"""The MoE expert backends (loop, grouped_mm, fused) are interchangeable: same outputs and same
gradients for every router, including empty experts, a single token and very uneven loads; the
GPU-only megablocks backend fails on CPU with an install hint; grouped_mm falls back to the loop
on misaligned shapes; and whole models give the same logits and share checkpoints across backends."""
from __future__ import annotations

import copy
import functools
import json
import warnings
from typing import Any

import pytest
import torch
from moe_helpers import build_moe_layer

import zoo
from zoo.moe import MoEFFN
from zoo.moe import experts as moe_experts

pytestmark = pytest.mark.usefixtures("registry_unchanged", "one_intra_op_thread")




BACKENDS = ("loop", "grouped_mm", "fused")
H, F, E = 32, 16, 8  # 32*4 and 16*4 bytes: both multiples of 16, so grouped_mm really runs

# id: (router, router_options, top_k, training)
ROUTERS = {
    "topk-olmoe": ("topk", {"renormalize": False}, 2, True),
    "topk-mixtral": ("topk", {"renormalize": True}, 2, True),
    "switch": ("switch", {}, 1, True),
    "switch-capacity": ("switch", {"capacity_factor": 1.0}, 1, True),
    "sigmoid-bias": ("sigmoid-bias", {"route_scale": 2.5}, 2, True),
    "sinkhorn-train": ("sinkhorn", {}, 2, True),
    "sinkhorn-eval": ("sinkhorn", {}, 2, False),
    "expert-choice": ("expert-choice", {"allow_causal": True}, 2, True),
}
SCENARIOS = ("random", "empty-expert", "single-token", "uneven")


@functools.lru_cache(maxsize=None)
def _merged_config(key: str) -> zoo.ModelConfig:
    return zoo.get_config(zoo.ModelConfig(), json.loads(key))


def moe_config(router: str = "topk", options: Any = None, top_k: int = 2, backend: str = "loop", num_experts: int = E,
               d_model: int = H, hidden: int = F, n_heads: int = 4, **extra: Any) -> zoo.ModelConfig:
    """A config from the schema defaults (so no variant's router_options leak in) with an MoE FFN.
    Merging is slow (omegaconf), so each distinct config is merged once and copied."""
    overrides = {"d_model": d_model, "n_heads": n_heads, "ffn": {"type": "moe"}, **extra,
                 "moe": {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden, "backend": backend,
                         "router": router, "router_options": dict(options or {})}}
    return copy.deepcopy(_merged_config(json.dumps(overrides, sort_keys=True)))


def make_layer(seed: int = 0, **kw: Any) -> MoEFFN:
    return build_moe_layer(moe_config(**kw), seed)


def scenario_input(name: str, layer: MoEFFN) -> torch.Tensor:
    """The input of a scenario; 'empty-expert' and 'uneven' also bend the router weights.

    Feature 0 of every token is a constant 4, so a router row's weight on feature 0 shifts that
    expert's logit for all tokens alike: -50 keeps the last expert from ever being chosen, +5
    makes expert 0 every token's first choice."""
    g = torch.Generator().manual_seed(1)
    d = layer.experts.mlp.hidden
    if name == "single-token":
        return torch.randn(1, 1, d, generator=g)
    x = torch.randn(2, 12, d, generator=g)
    if name == "random":
        return x
    x[..., 0] = 4.0
    w = layer.router.layer.weight
    with torch.no_grad():
        if name == "empty-expert":
            w[-1].zero_()
            w[-1, 0] = -50.0
            if hasattr(layer.router, "expert_bias"):
                layer.router.expert_bias[-1] = -1.0
        else:  # uneven
            w[0, 0] = 5.0
    return x


def run_backward(layer: MoEFFN, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y, aux = layer(x)
    (y * grad_out).sum().backward()

    def grad(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p) if p.grad is None else p.grad

    mlp = layer.experts.mlp
    return {"y": y.detach(), "x.grad": x.grad, "router.grad": grad(layer.router.layer.weight),
            "w1.grad": grad(mlp.w1), "v1.grad": grad(mlp.v1), "w2.grad": grad(mlp.w2),
            "tokens_per_expert": aux.stats["tokens_per_expert"], "dropped": torch.tensor(aux.stats["dropped"])}


def layers_on_every_backend(router: str, options: Any, top_k: int, training: bool, dtype=torch.float32,
                            **kw: Any) -> dict[str, MoEFFN]:
    """One layer per backend, all carrying the loop layer's weights (and buffers) by state_dict."""
    ref = make_layer(router=router, options=options, top_k=top_k, backend="loop", **kw)
    if hasattr(ref.router, "expert_bias"):  # a non-trivial bias that changes the selection
        with torch.no_grad():
            ref.router.expert_bias.copy_(0.05 * torch.randn(ref.router.expert_bias.shape,
                                                            generator=torch.Generator().manual_seed(5)))
    layers = {"loop": ref}
    for backend in BACKENDS[1:]:
        layer = make_layer(seed=99, router=router, options=options, top_k=top_k, backend=backend, **kw)
        layer.load_state_dict(ref.state_dict())
        layers[backend] = layer
    for layer in layers.values():
        layer.to(dtype).train(training)
    return layers


def test_parity_shapes_really_use_grouped_mm():
    """Guard: the shapes of the parity tests are ones grouped_mm accepts (no silent loop fallback)."""
    x = torch.zeros(3, H)
    assert moe_experts.resolve_backend("grouped_mm", x, H, F) == "grouped_mm"
    assert moe_experts.resolve_backend("grouped_mm", x.bfloat16(), H, F) == "grouped_mm"
    assert moe_experts.resolve_backend("fused", x, H, F) == "fused"
    assert moe_experts.resolve_backend("loop", x, H, F) == "loop"


def test_auto_on_cpu_picks_by_expert_size():
    """auto on CPU: grouped_mm for small experts (OLMoE-like: many experts, few rows each), fused for large
    ones, and fused where grouped_mm's stride limits refuse the shape."""
    x = torch.zeros(3, 256)
    small = 128 * 256 * 128  # the OLMoE-shaped model of benchmarks/train_step.py: 1024 tokens x 8 / 64 experts
    assert small < moe_experts.FUSED_MIN_MACS
    assert moe_experts.resolve_backend("auto", x, 256, 128, rows_per_expert=128) == "grouped_mm"
    assert moe_experts.resolve_backend("auto", x.bfloat16(), 256, 128, rows_per_expert=128) == "grouped_mm"
    assert moe_experts.resolve_backend("auto", x, 512, 1024, rows_per_expert=1024) == "fused"
    assert moe_experts.resolve_backend("auto", torch.zeros(3, 6), 6, 10, rows_per_expert=1) == "fused"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("rid", list(ROUTERS))
def test_backends_agree_fp32(rid, scenario, monkeypatch):
    router, options, top_k, training = ROUTERS[rid]
    if scenario == "empty-expert" and router == "expert-choice":
        pytest.skip("expert choice: every expert takes exactly C tokens, so none can be empty")
    torch.manual_seed(0)
    layers = layers_on_every_backend(router, options, top_k, training)
    x = scenario_input(scenario, layers["loop"])
    for backend in BACKENDS[1:]:  # the same bent router weights on every backend
        layers[backend].load_state_dict(layers["loop"].state_dict())
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    calls = []
    real_grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real_grouped_mm(*a, **k))
    results = {b: run_backward(layers[b], x, grad_out) for b in BACKENDS}
    assert calls, "the grouped_mm backend never called torch's grouped_mm"

    ref = results["loop"]
    for backend in BACKENDS[1:]:
        for key, value in ref.items():
            torch.testing.assert_close(results[backend][key], value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{rid}/{scenario}: {backend} vs loop, {key}: {m}")
    assert torch.isfinite(ref["y"]).all() and ref["x.grad"].abs().sum() > 0 and ref["router.grad"].abs().sum() > 0

    load = ref["tokens_per_expert"]
    if scenario == "empty-expert":
        assert load[-1] == 0, load
        rows = slice((E - 1) * F, E * F)  # the empty expert's slab rows get no gradient, on any backend
        for backend in BACKENDS:
            for key in ("w1.grad", "v1.grad", "w2.grad"):
                assert results[backend][key][rows].abs().max() == 0, (backend, key)
    if scenario == "uneven":
        T = x.shape[0] * x.shape[1]
        if router == "switch" and options.get("capacity_factor"):
            capacity = -(-T // E)  # ceil(T / E * 1.0)
            assert ref["dropped"] == T - int(load.sum()) > 0 and load[0] == capacity, (load, ref["dropped"])
        elif router in ("topk", "switch", "sigmoid-bias") or (router == "sinkhorn" and not training):
            assert load[0] == T and load.max() >= 2 * load.float().mean(), load  # every token picks expert 0
    if scenario == "single-token":
        assert int(load.sum()) == (E * 1 if router == "expert-choice" else top_k)


@pytest.mark.parametrize("rid", list(ROUTERS))
def test_backends_agree_bf16(rid):
    router, options, top_k, training = ROUTERS[rid]
    torch.manual_seed(0)
    layers = layers_on_every_backend(router, options, top_k, training, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, H, generator=g).bfloat16()
    grad_out = torch.randn(2, 16, H, generator=g).bfloat16()
    results = {b: run_backward(layers[b], x, grad_out) for b in BACKENDS}
    ref = results["loop"]
    for key in ("y", "x.grad", "router.grad", "w1.grad", "v1.grad", "w2.grad"):
        assert ref[key].dtype == torch.bfloat16, key
    for backend in BACKENDS[1:]:
        assert torch.equal(results[backend]["tokens_per_expert"], ref["tokens_per_expert"])
        for key in ("y", "x.grad", "router.grad", "w1.grad", "v1.grad", "w2.grad"):
            a, b = results[backend][key].float(), ref[key].float()
            assert a.dtype == b.dtype and torch.isfinite(a).all()
            scale = b.abs().max().clamp_min(1e-6)
            err = (a - b).abs().max() / scale
            assert err < 3e-2, f"{rid}: {backend} vs loop in bf16, {key}: max error {err:.3g} of the largest value"


def test_megablocks_backend_fails_on_cpu_with_install_hint():
    layer = make_layer(backend="megablocks")
    with pytest.raises(zoo.ZooError) as info:
        layer(torch.randn(4, H))
    msg = str(info.value)
    assert "megablocks" in msg.lower() and "CUDA" in msg
    assert "pip install" in msg  # says how to install it
    # and through a whole model built with the option
    model = zoo.build(moe_config(backend="megablocks", n_layers=1, vocab_size=32))
    with pytest.raises(zoo.ZooError, match="(?i)megablocks"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(zoo.ConfigError, match="moe.backend"):
        moe_config(backend="cutlass")


@pytest.mark.parametrize("d_model,hidden,n_heads", [(32, 10, 4), (18, 16, 1)], ids=["ffn-misaligned", "hidden-misaligned"])
def test_grouped_mm_falls_back_to_loop_on_misaligned_strides(d_model, hidden, n_heads, monkeypatch):
    assert (d_model * 4) % 16 or (hidden * 4) % 16  # the case: a stride that is not a multiple of 16 bytes
    kw = dict(d_model=d_model, hidden=hidden, n_heads=n_heads)
    ref = make_layer(backend="loop", **kw)
    layer = make_layer(seed=7, backend="grouped_mm", **kw)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, d_model, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    moe_experts._warn_fallback.cache_clear()  # it warns once per shape and process
    calls = []
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1))
    with pytest.warns(UserWarning, match="grouped_mm.*loop"):
        got = run_backward(layer, x, grad_out)
    assert not calls  # grouped_mm was never asked to take the misaligned shape
    want = run_backward(ref, x, grad_out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)


def test_grouped_mm_takes_a_stride_zero_gradient():
    """``y.sum()`` sends back an expanded (stride-0) gradient, which grouped_mm rejects unless made contiguous."""
    ref = make_layer(backend="loop")
    layer = make_layer(seed=3, backend="grouped_mm")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, H, generator=torch.Generator().manual_seed(0))
    grads = []
    for lay in (layer, ref):
        xx = x.clone().requires_grad_(True)
        y, _ = lay(xx)
        y.sum().backward()
        grads.append((xx.grad, lay.experts.mlp.w1.grad, lay.experts.mlp.w2.grad, lay.router.layer.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_dispatch_alone_takes_a_stride_zero_gradient(dtype):
    """The backend's autograd Function itself, where ``out.sum()``'s expanded gradient reaches its hand-written
    backward directly; an expert without tokens in the middle; gate-weight gradients included."""
    from zoo.kernels.moe_glu import grouped_glu
    from zoo.moe import Routing, sort_by_expert

    g = torch.Generator().manual_seed(0)
    expert = torch.tensor([2, 0, 3, 2, 0, 2, 3, 0, 2, 2])  # expert 1 gets nothing
    token = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    x = torch.randn(5, H, generator=g).to(dtype)
    weight = torch.rand(10, generator=g)
    ws = [(0.2 * torch.randn(4, F, H, generator=g)).to(dtype) for _ in range(3)]

    def loop_reference(xx, wt, w1, v1, w2):  # the plain per-assignment definition
        out = torch.zeros_like(xx)
        for n in range(len(token)):
            t, e = int(token[n]), int(expert[n])
            h = torch.nn.functional.silu(xx[t] @ w1[e].t()) * (xx[t] @ v1[e].t())
            out = out.index_add(0, token[n:n + 1], (wt[n] * (h @ w2[e])).unsqueeze(0).to(xx.dtype))
        return out

    def grouped(xx, wt, w1, v1, w2):
        d = sort_by_expert(Routing(token, expert, wt, None, None, None, 2), 4)
        return grouped_glu(xx, d.token_N, d.weight_N, d.counts_E, w1, v1, w2)

    results = []
    for fn in (grouped, loop_reference):
        xx, wt = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ww = [w.clone().requires_grad_(True) for w in ws]
        fn(xx, wt, *ww).sum().backward()
        results.append([xx.grad, wt.grad] + [w.grad for w in ww])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert results[0][2][1].abs().sum() == 0  # the empty expert's weights get a zero gradient


def test_auto_backend_on_cpu_matches_loop():
    ref = make_layer(backend="loop")
    layer = make_layer(seed=3, backend="auto")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------
def tiny_model_config(backend: str, router: str) -> zoo.ModelConfig:
    options = {"renormalize": False} if router == "topk" else {"update_rate": 0.01}
    return moe_config(router=router, options=options, backend=backend, num_experts=4, n_layers=2, vocab_size=64,
                      max_seq_len=32, norm_strategy="prenorm")


@pytest.mark.parametrize("router", ["topk", "sigmoid-bias"])
def test_model_logits_loss_and_checkpoints_agree_across_backends(router, tmp_path):
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 12))
    targets = torch.roll(idx, -1, dims=1)
    models = {}
    for i, backend in enumerate(BACKENDS + ("auto",)):
        torch.manual_seed(100 + i)  # different init everywhere: the checkpoint must bring the weights
        models[backend] = zoo.build(tiny_model_config(backend, router))
    src = models["grouped_mm"]
    if router == "sigmoid-bias":
        with torch.no_grad():
            for block in src.blocks:
                block.ffn.router.expert_bias.copy_(0.1 * torch.randn(4))
    torch.save(src.state_dict(), tmp_path / "ckpt.pt")
    outs = {}
    for backend, model in models.items():
        if model is not src:
            model.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True)
        model.eval()
        with torch.no_grad():
            outs[backend] = model(idx, targets=targets)
    ref = outs["loop"]
    for backend, out in outs.items():
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
        for a, b in zip(out.router_stats, ref.router_stats):
            assert torch.equal(a["tokens_per_expert"], b["tokens_per_expert"])
    # and the state_dict keys are the same whatever the backend
    keys = {tuple(m.state_dict()) for m in models.values()}
    assert len(keys) == 1


def test_model_gradients_agree_across_backends():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 10))
    ref = zoo.build(tiny_model_config("loop", "topk"))
    grads = {}
    for backend in BACKENDS:
        model = zoo.build(tiny_model_config(backend, "topk"))
        model.load_state_dict(ref.state_dict())
        out = model(idx, targets=torch.roll(idx, -1, dims=1))
        (out.loss + out.aux_loss).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for backend in BACKENDS[1:]:
        for name, g in grads["loop"].items():
            torch.testing.assert_close(grads[backend][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{backend} {name}: {m}")


def test_megablocks_backend_matches_the_loop_to_float64_rounding_with_a_reference_gmm(monkeypatch):
    """MegaBlocks' GLU path, with a plain-PyTorch gmm standing in for grouped_gemm's (CPU has none), equals
    the loop reference in float64, output and weight gradients, with empty experts. The two paths multiply
    differently laid-out operands, and on some CPUs (AVX-512) float64 GEMM then sums in another order, so
    the bound is float64 rounding relative to each tensor's scale; a wrong layout or expert offset is off
    by order one."""
    import importlib.util
    from pathlib import Path

    from zoo.kernels.moe_glu import expert_glu_reference
    from zoo.moe import experts
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # its `from common import ...`
    spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).parents[1] / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(experts, "megablocks_gmm", lambda: gpu.reference_gmm)
    gen = torch.Generator().manual_seed(0)
    E, H, F, T = 6, 16, 24, 20
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    ws = [torch.randn(E, F, H, generator=gen, dtype=torch.float64) for _ in range(3)]
    expert = torch.sort(torch.randint(0, E - 2, (2 * T,), generator=gen)).values
    token = torch.randint(0, T, (2 * T,), generator=gen)
    weight = torch.rand(2 * T, generator=gen, dtype=torch.float64)
    counts = torch.bincount(expert, minlength=E)
    results = []
    for glu in (expert_glu_reference, experts.megablocks_glu):
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        out = glu(leaves[0], token, weight, counts, *leaves[1:])
        out.square().sum().backward()
        results.append([out, *(leaf.grad for leaf in leaves)])
    for a, b in zip(*results):
        assert float((a - b).abs().max()) <= 1e-13 * float(a.abs().max())
    mixed = experts.megablocks_glu(x.bfloat16(), token, weight.float(), counts, *(w.float() for w in ws))
    assert mixed.dtype == torch.bfloat16  # bf16 activations with fp32 weights: cast, not refused
    assert float((mixed.double() - results[0][0]).norm() / results[0][0].norm()) < 2e-2
