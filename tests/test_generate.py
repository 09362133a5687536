"""Generation with a KV cache, the max-attention-logit metric and the KV-cache size in stats.

Cached greedy decoding must give exactly the tokens of recomputing the whole sequence at every
step (the training forward, argmax), for every registered norm strategy, dense and MoE, for
left-padded batches, sliding windows, GQA and MQA, and for HF models imported into the zoo
against transformers' own ``generate``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import zoo
import zoo.cli
from zoo.model.generate import GenerationError, sample_next
from zoo.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SMALL = ["n_layers=2", "d_model=64", "n_heads=4", "ffn.hidden_size=96", "moe.num_experts=4", "moe.hidden_size=48",
         "max_seq_len=64"]
STRATEGY_OPTIONS = {"mixln": ["norm_options.alpha=0.5"]}  # one Post-LN layer of two


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random and large enough that the logits are decisive (no near-ties in argmax)
    and routing is far from uniform; norm gains away from 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "bias" not in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def small_model(strategy: str = "hybridnorm", ffn: str = "dense", extra: tuple[str, ...] = (), seed: int = 0) -> zoo.ZooModel:
    variant = "tiny-moe-prenorm" if ffn == "moe" else "tiny-dense-prenorm"
    overrides = [*SMALL, f"norm_strategy={strategy}", *STRATEGY_OPTIONS.get(strategy, []), *extra]
    return randomize(zoo.build(variant, overrides).float(), seed)


@torch.no_grad()
def uncached_greedy(model: zoo.ZooModel, prompt: torch.Tensor, n: int) -> list[int]:
    """The reference: the full training forward on the growing sequence, argmax of the last position."""
    seq = prompt[None] if prompt.dim() == 1 else prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, -n:].tolist()


def prompt(length: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Cached greedy == uncached recomputation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize("strategy", REGISTRY.names("norm strategy"))
def test_cached_greedy_equals_uncached_recomputation(strategy, ffn):
    model = small_model(strategy, ffn)
    p = prompt(6, seed=1)
    out = model.generate(p[None], 12)
    assert out.shape == (1, 18) and torch.equal(out[0, :6], p)
    assert out[0, 6:].tolist() == uncached_greedy(model, p, 12), strategy
    # and the logits themselves, position by position, prefill then one token at a time
    seq = torch.cat([p, prompt(10, seed=2)])[None]
    with torch.no_grad():
        full = model(seq).logits
        cache = model.new_cache(seq.shape[1])
        steps = [model(seq[:, :6], cache=cache).logits]
        for t in range(6, seq.shape[1]):
            steps.append(model(seq[:, t:t + 1], cache=cache, positions=torch.tensor([[t]])).logits)
    assert full.abs().max() > 1.0
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy, ffn, extra", [
    ("hybridnorm", "dense", ()),
    ("hybridnorm-star", "moe", ()),
    ("prenorm", "dense", ("n_kv_heads=2", "attention.sliding_window=4")),
])
def test_left_padded_rows_equal_each_prompt_alone(strategy, ffn, extra):
    model = small_model(strategy, ffn, extra)
    prompts = [prompt(3, 2), prompt(9, 3), prompt(6, 4), prompt(1, 5)]
    ids, mask = left_pad(prompts)
    out = model.generate(ids, 10, attention_mask=mask)
    assert out.shape == (4, 19) and torch.equal(out[:, :9], ids)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], 10)[0, len(p):].tolist()
        assert out[row, 9:].tolist() == alone == uncached_greedy(model, p, 10), row


@pytest.mark.parametrize("extra", [
    ("attention.sliding_window=4",),
    ("n_kv_heads=2",),
    ("n_kv_heads=1",),
    ("n_kv_heads=1", "attention.sliding_window=3"),
], ids=["window", "gqa", "mqa", "mqa-window"])
def test_sliding_window_gqa_mqa(extra):
    model = small_model("hybridnorm", "dense", extra)
    for seed, length in ((6, 2), (7, 9)):  # prompts shorter and longer than the window
        p = prompt(length, seed)
        assert model.generate(p[None], 14)[0, length:].tolist() == uncached_greedy(model, p, 14)


def test_unpadded_batch_and_one_dimensional_prompt():
    model = small_model()
    a, b = prompt(5, 8), prompt(5, 9)
    out = model.generate(torch.stack([a, b]), 6)
    assert out[0, 5:].tolist() == uncached_greedy(model, a, 6) and out[1, 5:].tolist() == uncached_greedy(model, b, 6)
    assert torch.equal(model.generate(a, 6), out[0])


def test_bf16_model_generates():
    model = small_model().to(torch.bfloat16)
    out = model.generate(prompt(4, 1)[None], 5)
    assert out.shape == (1, 9) and out.dtype == torch.long


def test_generation_leaves_the_training_mode_alone():
    model = small_model(ffn="moe").train()
    model.generate(prompt(4, 1)[None], 3)
    assert model.training


def test_eos_stops_finished_rows():
    model = small_model()
    p = prompt(5, 1)
    greedy = uncached_greedy(model, p, 8)
    eos = greedy[2]
    out = model.generate(torch.stack([p, prompt(5, 2)]), 8, eos_id=eos)
    first = out[0, 5:].tolist()
    assert first[: first.index(eos) + 1] == greedy[: greedy.index(eos) + 1]
    assert all(t == eos for t in first[first.index(eos):])


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = small_model()
    p = prompt(4, 1)[None]
    a = model.generate(p, 16, temperature=2.0, seed=7)
    assert torch.equal(a, model.generate(p, 16, temperature=2.0, seed=7))
    assert not torch.equal(a, model.generate(p, 16, temperature=2.0, seed=8))
    greedy = model.generate(p, 16)
    assert torch.equal(model.generate(p, 16, temperature=1.0, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(p, 16, temperature=1.0, top_p=1e-6, seed=3), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0, 1}  # 0.4 alone is short of 0.5
    assert set(sample_next(logits, 1.0, top_p=0.4, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_k=3, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, generator=gen).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, needle", [
    ({"top_p": 0.0}, "top_p must lie in (0, 1]"),
    ({"top_p": 1.5}, "top_p must lie in (0, 1]"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"max_new_tokens": 61}, "exceeds the model's max_seq_len 64"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 0]])}, "LEFT padding"),
])
def test_bad_settings_are_refused(kwargs, needle):
    model = small_model()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError) as info:
        model.generate(prompt(4, 1)[None], **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_attention_without_cache_support_is_refused(runtime_plugin):
    import torch.nn.functional as F
    from torch import nn

    class PlainAttention(zoo.Attention):
        def __init__(self, cfg, layer, make_norm, *, qkv_norm=(), qkv_norm_width="head", options=None):
            super().__init__(cfg, layer, make_norm, qkv_norm=qkv_norm, qkv_norm_width=qkv_norm_width, options=options)
            self.h, self.d = cfg.n_heads, cfg.head_size
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
            self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, self.h, self.d).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))

        def init_weights(self, init):
            init(self.qkv.weight, "q")
            init(self.o.weight, "o")

    class Plugin:
        @zoo.hookimpl
        def register_attention(self, register):
            register("plain-nocache", PlainAttention)

    runtime_plugin(Plugin(), "test-generate-nocache")
    model = zoo.build("tiny-dense-prenorm", [*SMALL, "norm_strategy=prenorm", "attention.type=plain-nocache"])
    model(prompt(4, 1)[None])  # training works
    with pytest.raises(GenerationError, match="attention 'plain-nocache' .* does not support KV-cached generation"):
        model.generate(prompt(4, 1)[None], 3)


# ---------------------------------------------------------------------------------------------
# HF models imported into the zoo generate what transformers generates
# ---------------------------------------------------------------------------------------------
HF_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
HF_CASES = {
    "llama": ("LlamaConfig", dict(intermediate_size=96)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_imported_hf_model_generates_what_transformers_generates(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from zoo.interop.hf import from_hf

    cls_name, kwargs = HF_CASES[case]
    config = getattr(transformers, cls_name)(**HF_BASE, **kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    randomize(hf, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    model = zoo.load(from_hf(tmp_path / "hf", tmp_path / "zoo")).eval()

    prompts = [prompt(7, 1, 128), prompt(3, 2, 128)]
    ids, mask = left_pad(prompts)
    n = 10
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(model.generate(ids, n, attention_mask=mask), expected)
    alone = hf.generate(prompts[0][None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompts[0][None], n), alone)
    assert len(set(alone[0, 7:].tolist())) > 2


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def test_cli_generate_fresh_variant_streams_text(capsys):
    assert zoo.cli.main(["generate", "tiny-dense-hybridnorm", "--prompt", "def ", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and out.endswith("\n")
    assert "freshly initialized" in err and "tiny-dense-hybridnorm" in err


def test_cli_generate_checkpoint_prints_the_models_tokens(tmp_path, capsys):
    from zoo.train.tokenizer import ByteTokenizer
    model = small_model("hybridnorm", "moe")
    ckpt = zoo.save(model, tmp_path / "model.safetensors", variant="tiny-moe-hybridnorm")
    argv = ["generate", str(ckpt), "--prompt", "x = ", "--max-new-tokens", "12", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.9", "--seed", "5"]
    assert zoo.cli.main(argv) == 0
    out, err = capsys.readouterr()
    tok = ByteTokenizer()
    new = model.generate(torch.tensor([tok.encode("x = ")]), 12, temperature=0.9, top_k=40, top_p=0.9, seed=5,
                         eos_id=tok.eos_id)[0, 4:].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert out == "x = " + tok.decode(new) + "\n"
    assert err == ""


def test_cli_bad_top_p_is_one_line(capsys):
    assert zoo.cli.main(["generate", "tiny-dense-prenorm", "--prompt", "a", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err == "zoo: error: top_p must lie in (0, 1], got 1.5\n"


# ---------------------------------------------------------------------------------------------
# max_attn_logit
# ---------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    T, d = x.shape[1], x.shape[-1]
    inv = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@pytest.mark.parametrize("strategy, extra", [
    ("hybridnorm", ("n_kv_heads=2",)),
    ("prenorm", ("n_kv_heads=1", "attention.sliding_window=5")),
])
def test_max_attn_logit_matches_a_hand_computation(strategy, extra):
    model = small_model(strategy, "dense", extra)
    cfg = model.cfg
    inputs: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().double())) for b in model.blocks]
    for b in model.blocks:
        b.attn.record_max_logit = True
    idx = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    H, Hkv, d = cfg.n_heads, cfg.kv_heads, cfg.head_size
    T = idx.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if cfg.attention.sliding_window is not None:
        allowed &= j > i - cfg.attention.sliding_window
    future_larger = []
    for layer, (block, x) in enumerate(zip(model.blocks, inputs)):
        w = block.attn.qkv.weight.detach().double()
        q = (x @ w[: H * d].T).view(3, T, H, d)
        k = (x @ w[H * d: (H + Hkv) * d].T).view(3, T, Hkv, d)
        if block.attn.q_norm is not None:
            q = _rms(q, block.attn.q_norm.weight.detach().double(), cfg.norm_eps)
            k = _rms(k, block.attn.k_norm.weight.detach().double(), cfg.norm_eps)
        q, k = _rope(q, cfg.attention.rope_theta), _rope(k, cfg.attention.rope_theta)
        k = k.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        expected = scores.masked_fill(~allowed, float("-inf")).max()
        got = block.attn.last_max_logit
        assert got.dim() == 0 and not got.requires_grad
        assert float(got) == pytest.approx(float(expected), rel=1e-5), layer
        future_larger.append(float(scores.max()) > float(expected))
    assert any(future_larger), "no masked-out logit exceeds the allowed maximum: the mask goes untested"


def test_train_metrics_record_max_attn_logit(tmp_path, monkeypatch):
    from zoo.train import TrainConfig, train
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(100)))
    tc = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=100, checkpoint_every=100,
                     data=str(corpus))
    result = train("tiny-dense-hybridnorm", ["n_layers=2", "d_model=64", "n_heads=2", "ffn.hidden_size=96"], tc,
                   out_dir=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in Path(result.metrics).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        values = r["max_attn_logit"]
        assert len(values) == 2 and all(isinstance(v, float) and math.isfinite(v) for v in values), values


# ---------------------------------------------------------------------------------------------
# KV-cache bytes per token
# ---------------------------------------------------------------------------------------------
def test_kv_cache_bytes_per_token_for_mha_gqa_mqa(capsys):
    sizes = {}
    for kv in (4, 2, 1):
        st = zoo.stats("tiny-dense-prenorm", [f"n_kv_heads={kv}"], flops=False)
        assert st.kv_cache_bytes_per_token == 2 * 4 * kv * 32 * 4  # layers, KV heads, head size, fp32
        assert st.kv_cache_bytes_per_token_bf16 == st.kv_cache_bytes_per_token // 2
        sizes[kv] = st.kv_cache_bytes_per_token
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]
    assert zoo.cli.main(["info", "tiny-dense-prenorm", "--set", "n_kv_heads=1", "--seq-len", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_bytes_per_token"] == sizes[1] and info["kv_cache_bytes_per_token_bf16"] == sizes[1] // 2
    assert zoo.cli.main(["info", "tiny-dense-prenorm", "--seq-len", "8"]) == 0
    assert "KV cache per token: 4,096 bytes at fp32, 2,048 at bf16" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cached_greedy_equals_uncached():
    model = small_model("hybridnorm", "moe", ("n_kv_heads=2",)).cuda()
    prompts = [prompt(3, 2).cuda(), prompt(8, 3).cuda()]
    ids, mask = left_pad(prompts)
    out = model.generate(ids.cuda(), 8, attention_mask=mask.cuda())
    for row, p in enumerate(prompts):
        assert out[row, 8:].tolist() == uncached_greedy(model, p, 8)
