"""The conformance checks that run in this process, one function per check id.

Each takes a ``Subject`` and the small model kind ("dense", "moe" or "variant") and raises ``CheckFailure``
with what went wrong, or ``NotApplicable`` where the check does not concern the plugin (the KV cache of an
attention that does not support it). They are independent: each builds what it needs, so one defect fails
the checks that see it and no others.
"""
from __future__ import annotations

import dataclasses
import typing
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..builder import build_model, empty_model
from ..config import ModelConfig, merge_config
from ..errors import ZooError
from ..kernels import use as use_kernels
from ..model import ZooModel
from ..registry import REGISTRY
from .subjects import Subject

BATCH = (2, 16)


class CheckFailure(AssertionError):
    """A conformance check failed; the message says what the plugin did wrong."""


class NotApplicable(Exception):
    """The check does not concern this plugin (the reason is the message)."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailure(message)


def config(subject: Subject, model: str, extra: tuple[str, ...] = ()) -> ModelConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kit's shrinking overrides touch moe.* of dense models too
        cfg = subject.config(model)
        return merge_config(cfg, list(extra)) if extra else cfg


def build(subject: Subject, model: str, seed: int = 0, dtype: Optional[torch.dtype] = None) -> ZooModel:
    torch.manual_seed(seed)
    return build_model(config(subject, model), dtype=dtype, variant=subject.name if model == "variant" else None)


def tokens(cfg: ModelConfig, batch: tuple[int, int] = BATCH, seed: int = 1) -> Tensor:
    return torch.randint(0, cfg.vocab_size, batch, generator=torch.Generator().manual_seed(seed))


def loss_of(model: ZooModel, idx: Tensor) -> Tensor:
    out = model(idx[:, :-1], idx[:, 1:])
    return out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)


# -- the checks -------------------------------------------------------------------------------------
def check_options(subject: Subject, model: str) -> None:
    """The plugin builds with its default options, and every module it makes keeps them as ``self.options``."""
    if subject.kind == "norm layer":
        layer = subject.plugin(8, eps=1e-5)
        expect(isinstance(layer, nn.Module), f"norm layer {subject.name!r} made {type(layer).__name__}, not an nn.Module")
        return
    classes = [subject.plugin]
    if subject.kind == "variant":
        cfg = config(subject, model)
        classes = [REGISTRY.get("norm strategy", cfg.norm_strategy), REGISTRY.get("attention", cfg.attention.type)]
        classes += [REGISTRY.get("router", cfg.moe.router)] if cfg.is_moe else []
    built = build(subject, model)
    for cls in classes:
        mods = [m for m in built.modules() if type(m) is cls]
        expect(bool(mods), f"no module of {cls.__name__} in the model built with {subject.id}")
        for m in mods:
            want = getattr(cls, "Options", None)
            has = getattr(m, "options", "missing")
            if want is None:
                expect(has is None, f"{cls.__name__} takes no options, but its instance keeps options={has!r}")
            else:
                expect(isinstance(has, want), f"{cls.__name__}.options is {has!r}, not its {want.__qualname__} "
                       f"instance: pass options on to super().__init__")


def _wrong_value(hint: Any) -> Any:
    """A value of the wrong type for a field annotated ``hint`` (a string where the field wants a number or bool)."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return "not-a-" + getattr(base, "__name__", "value")


def check_bad_options(subject: Subject, model: str) -> None:
    """An unknown option, and a wrongly typed value for each option, fail with a ``zoo.ConfigError`` (or another
    ``ZooError``) naming the key, never a bare exception."""
    if subject.kind == "variant":
        raise NotApplicable("a variant takes no options of its own")
    key = {"norm strategy": "norm_options", "norm layer": "norm_layer_options", "attention": "attention.options",
           "router": "moe.router_options"}[subject.kind]
    cases = [(f"{key}.not_an_option_of_{subject.name.replace('-', '_').replace('.', '_')}", "1")]
    options = getattr(subject.plugin, "Options", None)
    if options is not None and dataclasses.is_dataclass(options):
        hints = typing.get_type_hints(options)
        cases += [(f"{key}.{f.name}", _wrong_value(hints.get(f.name, Any))) for f in dataclasses.fields(options)]
    for k, value in cases:
        try:
            torch.manual_seed(0)
            build_model(config(subject, model, (f"{k}={value}",)), device="meta")
        except ZooError:
            continue
        except Exception as e:  # the defect this check exists for
            raise CheckFailure(f"{k}={value!r} raised {type(e).__name__}: {e}; raise zoo.ConfigError naming the key "
                               "(a typed Options field gets that for free)") from None
        expect(not k.split(".")[-1].startswith("not_an_option"), f"the unknown option {k} was accepted")


def check_meta_init(subject: Subject, model: str) -> None:
    """Built on ``meta``, materialized and initialized (as FSDP2 does), the model equals a direct build bit for bit:
    every value a plugin sets comes from ``reset_parameters`` or ``init_weights``, none only from ``__init__``."""
    direct = build(subject, model)
    cfg = direct.cfg
    torch.manual_seed(0)
    late = empty_model(cfg)
    late.to_empty(device="cpu")
    late.init_weights()
    a, b = direct.state_dict(), late.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    expect(not differ, f"after a meta build and init_weights(), {', '.join(differ[:4])} differ from a direct build: "
           "set them in reset_parameters() or init_weights(init), not only in __init__")


def check_forward_backward(subject: Subject, model: str) -> None:
    """Logits ``(B, T, vocab)`` for batch and sequence lengths 1 and more, finite losses and finite gradients."""
    m = build(subject, model).train()
    V = m.cfg.vocab_size
    for B, T in ((1, 1), (1, 9), (3, 1), (3, 9)):
        idx = tokens(m.cfg, (B, T + 1), seed=B * 10 + T)
        m.zero_grad(set_to_none=True)
        try:
            out = m(idx[:, :-1], idx[:, 1:])
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
            loss.backward()
        except Exception as e:
            raise CheckFailure(f"batch {B} x {T} tokens: {type(e).__name__}: {e}") from None
        expect(tuple(out.logits.shape) == (B, T, V), f"batch {B} x {T}: logits {tuple(out.logits.shape)}, not {(B, T, V)}")
        expect(bool(torch.isfinite(loss)), f"batch {B} x {T}: the loss is {loss.item()}")
        bad = [n for n, p in m.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        expect(not bad, f"batch {B} x {T}: non-finite gradients in {', '.join(bad[:4])}")


def check_gradients(subject: Subject, model: str) -> None:
    """Every parameter receives a gradient from the training loss."""
    m = build(subject, model).train()
    loss_of(m, tokens(m.cfg)).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    expect(not missing, f"no gradient reaches {', '.join(missing[:4])}" + (f" (and {len(missing) - 4} more)"
                                                                          if len(missing) > 4 else ""))


def check_dtypes(subject: Subject, model: str) -> None:
    """fp32 and bf16 both run, and bf16's logits follow fp32's (correlation above 0.98)."""
    m = build(subject, model).eval()
    idx = tokens(m.cfg)
    with torch.no_grad():
        ref = m(idx).logits
        expect(ref.dtype == torch.float32, f"an fp32 model gave {ref.dtype} logits")
        try:
            low = m.to(torch.bfloat16)(idx).logits
        except Exception as e:
            raise CheckFailure(f"in bf16: {type(e).__name__}: {e}") from None
    expect(low.dtype == torch.bfloat16, f"a bf16 model gave {low.dtype} logits")
    expect(bool(torch.isfinite(low).all()), "non-finite logits in bf16")
    corr = torch.corrcoef(torch.stack([ref.flatten(), low.float().flatten()]))[0, 1]
    expect(bool(corr > 0.98), f"bf16 logits correlate {float(corr):.3f} with fp32's")


def check_determinism(subject: Subject, model: str) -> None:
    """The same seed gives the same weights, and the same training step the same loss and gradients."""
    a, b = build(subject, model), build(subject, model)
    differ = [k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])]
    expect(not differ, f"two builds with seed 0 differ in {', '.join(differ[:4])}: draw from torch's generator")
    idx = tokens(a.cfg)
    results = []
    for m in (a, a):
        m.train().zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = loss_of(m, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l1, g1), (l2, g2) = results
    expect(bool(torch.equal(l1, l2)) and all(torch.equal(x, y) for x, y in zip(g1, g2)),
           f"two training steps under the same seed differ (losses {float(l1)!r} and {float(l2)!r})")


def check_kv_cache(subject: Subject, model: str) -> None:
    """Greedy generation with the KV cache gives the tokens of recomputing the whole sequence each step, and
    the cached step's logits equal the full forward's (fp64)."""
    if subject.kind == "router":
        raise NotApplicable("a router does not touch the cache")
    m = build(subject, model, dtype=torch.float64).eval()
    if not all(getattr(b.attn, "supports_cache", False) for b in m.blocks):
        raise NotApplicable(f"attention {m.cfg.attention.type!r} does not support the cache (supports_cache=False)")
    if m.cfg.is_moe and not REGISTRY.get("router", m.cfg.moe.router).causal:
        raise NotApplicable(f"router {m.cfg.moe.router!r} is not causal: a token's route depends on later tokens")
    prompt = tokens(m.cfg, (2, 5))
    out = m.generate(prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    expect(torch.equal(out, seq), f"cached greedy tokens {out[:, 5:].tolist()} differ from recomputed {seq[:, 5:].tolist()}")
    cache = m.new_cache(16)
    with torch.no_grad():
        m(out[:, :-1], cache=cache, positions=torch.arange(10).expand(2, 10))
        step = m(out[:, -1:], cache=cache, positions=torch.full((2, 1), 10)).logits[:, -1]
        full = m(out).logits[:, -1]
    err = float((step - full).abs().max())
    expect(err < 1e-8, f"the cached step's logits differ from the full forward's by {err:.3g}")


def check_compile(subject: Subject, model: str) -> None:
    """``torch.compile`` (graph capture with AOTAutograd, backend aot_eager, the zoo's kernels on their plain
    references so that only the plugin's code is under test) runs the forward and backward, and the compiled
    logits equal the eager ones."""
    import torch._dynamo
    if model == "moe" and subject.kind != "router":
        raise NotApplicable("compiled in the dense model; the MoE layer's experts run eagerly under torch.compile")
    m = build(subject, model)
    idx = tokens(m.cfg)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    try:
        with use_kernels("reference"), torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
            eager, got = m.eval()(idx).logits, compiled(idx).logits
        m.train()
        with use_kernels("reference"), torch._dynamo.config.patch(recompile_limit=64):
            compiled(idx[:, :-1], idx[:, 1:]).loss.backward()
    except Exception as e:
        raise CheckFailure(f"torch.compile: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        torch._dynamo.reset()
    err = float((eager - got).abs().max())
    expect(err < 1e-4, f"compiled logits differ from eager ones by {err:.3g}")


IN_PROCESS: dict[str, Callable[[Subject, str], None]] = {
    "options": check_options, "bad_options": check_bad_options, "meta_init": check_meta_init,
    "forward_backward": check_forward_backward, "gradients": check_gradients, "dtypes": check_dtypes,
    "determinism": check_determinism, "kv_cache": check_kv_cache, "compile": check_compile,
}
