"""Hugging Face interop: import transformers checkpoints as zoo models, export zoo models to transformers.

``from_hf(path_or_repo, out_dir)`` reads an HF folder (``config.json`` plus ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) with ``safetensors`` alone, maps it onto a zoo config and
state dict, and writes ``out_dir/model.safetensors`` (``zoo.save``) and ``out_dir/config.yaml``.
``to_hf(name_or_checkpoint, out_dir)`` writes ``config.json`` and ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Neither direction imports transformers.

Architectures (``model_type``), both ways, by their decoder layer's layout:

=============  ===========================================  =====================================
model_type     layout                                       notes
=============  ===========================================  =====================================
llama          pre-norm, dense                              ``attention_bias``: q/k/v bias, o zero
mistral        pre-norm, dense, sliding window
mixtral        pre-norm, MoE, renormalized top-k            ``router_jitter_noise``
qwen2_moe      pre-norm, MoE + gated shared expert          q/k/v biases; all layers sparse
olmoe          pre-norm, full-width q/k norms, MoE          ``norm_topk_prob`` (OLMoE: false)
qwen3          pre-norm, per-head q/k norms, dense
qwen3_moe      pre-norm, per-head q/k norms, MoE            all layers sparse
olmo2          output norms, full-width q/k norms, dense
flex_olmo      output norms, full-width q/k norms, MoE
deepseek_v3    pre-norm, latent attention (MLA), MoE with   group-limited sigmoid routing, shared
               dense first layers                           experts, RoPE interleaved and YaRN
=============  ===========================================  =====================================

Nothing here names a plugin: each declares what it is in transformers' terms, and the converter
matches layouts. A norm strategy declares ``hf_norms`` (its norms under the decoder layer's names:
``input_layernorm`` and ``post_attention_layernorm`` for pre-norm, ``post_attention_layernorm`` and
``post_feedforward_layernorm`` for output norms) and ``hf_qk_options`` (the q/k-norm widths it takes,
with the ``norm_options`` for each), or ``hf_missing`` (why no transformers architecture wires its
block); a norm layer ``hf_rms_norm``; an attention ``hf_names`` (its modules under the attention's
names, ``q_proj`` ... ``o_proj``, or ``kv_a_proj_with_mqa`` ... for latent attention) and
``hf_bias_options``; a router ``hf_renormalize_option`` (softmax top-k) or ``hf_bias_name`` (DeepSeek's
sigmoid routing with a balancing bias). The built-ins: prenorm, qknorm and olmo2; rmsnorm; mha and mla;
topk and sigmoid-bias.

Weights map one to one (RoPE pairs the same dimensions on both sides, so nothing is permuted): q/k/v
projections stack into ``attn.qkv``, gate/up into ``gate_up``, and expert ``e``'s gate / up / down
(transposed) into rows ``e*F:(e+1)*F`` of MegaBlocks' ``experts.mlp.w1`` / ``v1`` / ``w2``. Both the
per-expert layout of checkpoints on the Hub and transformers 5's fused ``experts.gate_up_proj`` /
``down_proj`` are read; exports use the per-expert layout, which every transformers version loads.

Training-only settings translate approximately. Mixtral's ``router_jitter_noise`` becomes ``moe.jitter``
(the zoo jitters the router's input only; Mixtral multiplies the whole MoE input, experts included).
transformers computes one load-balancing loss over all layers, about ``top_k`` at perfect balance,
times ``router_aux_loss_coef``; the zoo sums one per layer, each 1 at balance, times ``moe.lb_weight``.
So ``lb_weight = coef * top_k / n_layers`` (equal at balance) and back. transformers has no router
z-loss: imports set ``moe.z_weight=0``.

A variant without a transformers equivalent (HybridNorm, HybridNorm*, Post-LN, Mix-LN, Peri-LN,
DeepNorm, non-top-k routers, ...) raises ``HFConversionError`` saying why (its ``hf_missing``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from ..api import get_config
from ..builder import empty_model, resolve
from ..checkpoint import checkpoint_config, save, split_shards
from ..config import ConfigSource, ModelConfig, merge_config, resolve_options
from ..errors import ZooError
from ..files import CONFIG_NAME as ZOO_CONFIG_NAME
from ..files import WEIGHTS_NAME
from ..registry import REGISTRY
from ..sources import ModelSource, load_source, resolve_source

HF_CONFIG_NAME = "config.json"
HF_INDEX_NAME = "model.safetensors.index.json"
HF_SHARD_BYTES = 5 * 1024**3
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PRE = ("input_layernorm", "post_attention_layernorm")          # norms before each sublayer (Llama)
OUT = ("post_attention_layernorm", "post_feedforward_layernorm")  # norms on each sublayer's output (OLMo-2)
SPLIT = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}            # the widths of projections stored stacked


class HFConversionError(ZooError):
    """A Hugging Face checkpoint cannot be imported, or a zoo model has no transformers equivalent."""


@dataclass(frozen=True)
class Arch:
    """What a transformers architecture computes, in zoo terms, and where its config keeps it."""

    model_type: str
    hf_class: str
    norms: tuple[str, str] = PRE         # the decoder layer's two norms, by their transformers names
    qk_width: Optional[str] = None       # its q/k norms: "full" (one over the projection, OLMoE) or "head" (Qwen3)
    moe: bool = False
    mixtral_names: bool = False          # block_sparse_moe.experts.E.w1/w3/w2 (else mlp.experts.E.*_proj)
    renormalize: Optional[bool] = None   # fixed by the architecture (Mixtral), else config norm_topk_prob
    shared_expert: bool = False          # Qwen2-MoE's sigmoid-gated shared expert
    bias_key: Optional[str] = None       # config key turning on q/k/v biases: "attention_bias" (also o) or "qkv_bias"
    sliding: str = "none"                # none | plain (sliding_window) | qwen (use_sliding_window + layer_types)
    head_dim_key: bool = False           # the config class has head_dim (else it is hidden_size / heads)
    sparse_layers_keys: bool = False     # decoder_sparse_step / mlp_only_layers (Qwen MoE)
    jitter_key: Optional[str] = None     # router_jitter_noise (Mixtral)
    latent: bool = False                 # DeepSeek: latent attention, sigmoid group-limited routing, dense first
                                         # layers (first_k_dense_replace), ungated shared experts (mlp.shared_experts)
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    Arch("llama", "LlamaForCausalLM", bias_key="attention_bias", head_dim_key=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}),
    Arch("mistral", "MistralForCausalLM", sliding="plain", head_dim_key=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 131072, "sliding_window": 4096}),
    Arch("mixtral", "MixtralForCausalLM", moe=True, mixtral_names=True, renormalize=True, sliding="plain",
         head_dim_key=True, jitter_key="router_jitter_noise",
         defaults={"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072, "num_local_experts": 8,
                   "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}),
    Arch("qwen2_moe", "Qwen2MoeForCausalLM", moe=True, shared_expert=True, bias_key="qkv_bias", sliding="qwen",
         sparse_layers_keys=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "num_experts": 60,
                   "num_experts_per_tok": 4, "router_aux_loss_coef": 0.001, "qkv_bias": True}),
    Arch("olmoe", "OlmoeForCausalLM", qk_width="full", moe=True, bias_key="attention_bias",
         defaults={"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "num_experts": 64,
                   "num_experts_per_tok": 8, "router_aux_loss_coef": 0.01}),
    Arch("qwen3", "Qwen3ForCausalLM", qk_width="head", bias_key="attention_bias", sliding="qwen",
         head_dim_key=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "head_dim": 128}),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", qk_width="head", moe=True, bias_key="attention_bias",
         sliding="qwen", head_dim_key=True, sparse_layers_keys=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "num_experts": 128,
                   "num_experts_per_tok": 8, "router_aux_loss_coef": 0.001}),
    Arch("olmo2", "Olmo2ForCausalLM", OUT, "full", bias_key="attention_bias",
         defaults={"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048}),
    Arch("flex_olmo", "FlexOlmoForCausalLM", OUT, "full", moe=True, bias_key="attention_bias",
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 4096, "num_experts": 7,
                   "num_experts_per_tok": 5, "router_aux_loss_coef": 0.01}),
    Arch("deepseek_v3", "DeepseekV3ForCausalLM", moe=True, latent=True,
         defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "n_routed_experts": 256,
                   "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
                   "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "norm_topk_prob": True,
                   "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                   "v_head_dim": 128, "rope_interleave": True}),
)}
LATENT_EPS = 1e-6  # transformers' DeepseekV3 normalizes the q and kv latents at this eps, whatever rms_norm_eps says

# ---------------------------------------------------------------------------------------------
# Weight name mapping (one table, used both ways)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """Zoo tensor ``zoo`` is HF tensors ``hf`` concatenated along dim 0 (each transposed when ``t``)."""

    zoo: str
    hf: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    t: bool = False


def _pairs(arch: Arch, cfg: ModelConfig) -> list[Pair]:
    """Every zoo tensor of ``cfg`` with the HF tensors (names without the ``model.`` prefix) it is made of. The
    strategy's norms and the attention's tensors come by the transformers names their plugins declare
    (``hf_norms``, ``hf_names``); the rest is the zoo's own layout."""
    parts, keys = resolve(cfg), set(empty_model(cfg).state_dict())
    widths = {"q": cfg.n_heads * cfg.head_size, "kv": cfg.kv_heads * cfg.head_size}
    pairs = [Pair("embed.weight", ("embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        L, B = f"layers.{i}.", f"blocks.{i}."
        pairs += [Pair(B + f"strategy.{norm}.weight", (L + f"{hf}.weight",))
                  for norm, hf in parts.strategy.hf_norms.items() if B + f"strategy.{norm}.weight" in keys]
        for module, hf_modules in parts.attention.hf_names.items():
            for param in ("weight", "bias"):
                if B + f"attn.{module}.{param}" in keys:
                    sizes = tuple(widths[SPLIT[h]] for h in hf_modules) if len(hf_modules) > 1 else ()
                    pairs.append(Pair(B + f"attn.{module}.{param}", tuple(f"{L}self_attn.{h}.{param}" for h in hf_modules),
                                      sizes))
        if cfg.ffn_type(i) == "dense":
            m = L + "mlp."
            F = cfg.ffn.hidden_size
            pairs += [Pair(B + "ffn.gate_up.weight", (m + "gate_proj.weight", m + "up_proj.weight"), (F, F)),
                      Pair(B + "ffn.down.weight", (m + "down_proj.weight",))]
            continue
        E, F = cfg.moe.num_experts, cfg.moe.hidden_size
        if arch.mixtral_names:
            m = L + "block_sparse_moe."
            gate, up, down = (tuple(m + f"experts.{e}.{w}.weight" for e in range(E)) for w in ("w1", "w3", "w2"))
        else:
            m = L + "mlp."
            gate, up, down = (tuple(m + f"experts.{e}.{w}_proj.weight" for e in range(E)) for w in ("gate", "up", "down"))
        pairs += [Pair(B + "ffn.router.layer.weight", (m + "gate.weight",)),
                  Pair(B + "ffn.experts.mlp.w1", gate, (F,) * E),
                  Pair(B + "ffn.experts.mlp.v1", up, (F,) * E),
                  Pair(B + "ffn.experts.mlp.w2", down, (F,) * E, t=True)]
        if arch.latent:
            bias_name = REGISTRY.get("router", cfg.moe.router).hf_bias_name
            pairs.append(Pair(B + "ffn.router.expert_bias", (m + "gate." + bias_name,)))
        if arch.shared_expert or (arch.latent and cfg.moe.shared_experts):
            s = L + ("mlp.shared_experts." if arch.latent else "mlp.shared_expert.")
            S = cfg.moe.shared_hidden_size or cfg.moe.shared_experts * cfg.moe.hidden_size
            pairs += [Pair(B + "ffn.shared.gate_up.weight", (s + "gate_proj.weight", s + "up_proj.weight"), (S, S)),
                      Pair(B + "ffn.shared.down.weight", (s + "down_proj.weight",))]
        if arch.shared_expert:
            pairs.append(Pair(B + "ffn.shared_gate.weight", (L + "mlp.shared_expert_gate.weight",)))
    pairs.append(Pair("final_norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        pairs.append(Pair("head.weight", ("lm_head.weight",)))
    return pairs


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hf_folder(path_or_repo: Union[str, Path]) -> Path:
    """A local HF folder, or a Hub repository downloaded with ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise HFConversionError(f"{text} is a file; pass the folder holding config.json and model.safetensors")
    if not REPO_ID.match(text) or text.startswith(".") or text.count("/") > 1:
        raise HFConversionError(f"no such folder: {text} (pass a local folder with config.json and *.safetensors, "
                                "or a Hugging Face repository id such as org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HFConversionError(f"{text!r} is not a local folder, and downloading it needs huggingface_hub "
                                "(pip install huggingface_hub); or pass a local folder") from None
    try:
        return Path(snapshot_download(text, allow_patterns=[HF_CONFIG_NAME, "*.safetensors", HF_INDEX_NAME]))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFConversionError(f"{text!r} is not a local folder and could not be downloaded from the Hugging Face "
                                f"Hub ({type(e).__name__}: {why}); download it where there is network access "
                                f"(e.g. `hf download {text} --local-dir DIR`) and pass that folder") from None


def _read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / HF_CONFIG_NAME
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFConversionError(f"{folder} has no {HF_CONFIG_NAME}: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise HFConversionError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(hf, dict):
        raise HFConversionError(f"{path}: expected a JSON object")
    return hf


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / HF_INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / HF_INDEX_NAME).read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFConversionError(f"{folder / HF_INDEX_NAME}: not a valid safetensors index: {e}") from None
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        extra = (f"; it holds {', '.join(sorted(pickled))}, pickle files, which the zoo never loads: re-save the "
                 "model with save_pretrained(..., safe_serialization=True)") if pickled else ""
        raise HFConversionError(f"{folder} has neither {WEIGHTS_NAME} nor {HF_INDEX_NAME}{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:
            raise HFConversionError(f"{f}: cannot read safetensors: {e}") from None
    return tensors


def _get(hf: dict[str, Any], arch: Arch, key: str) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if key in arch.defaults:
        return arch.defaults[key]
    raise HFConversionError(f"config.json of this {arch.model_type} model has no {key!r}")


YARN_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
             "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim"}


def _rope(hf: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The zoo's ``attention`` RoPE keys (``rope_theta``, ``rope_layout``, ``yarn``) from transformers' config: its
    ``rope_parameters`` (transformers 5) or ``rope_scaling`` and ``rope_theta`` (4.x). YaRN imports where the
    architecture applies it as DeepSeek does (latent attention); other scalings are refused."""
    sources = [hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}]
    kinds = {d.get("rope_type", d.get("type")) for d in sources} - {None, "default"}
    kind = sorted(kinds)[0] if kinds else "default"
    params = {k: v for d in sources for k, v in d.items() if d.get("rope_type", d.get("type")) in (kind, None)}
    if len(kinds) > 1 or kind not in ("default", "yarn") or (kind == "yarn" and not arch.latent):
        raise HFConversionError(f"RoPE type {kind!r} (rope scaling) is not supported for {arch.model_type}: the zoo "
                                "imports plain RoPE, and YaRN where the model is DeepSeek-V3's")
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise HFConversionError("partial_rotary_factor != 1 is not supported: the zoo rotates the whole head")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    out: dict[str, Any] = {"rope_theta": float(theta if theta is not None else arch.defaults["rope_theta"])}
    if arch.latent:
        out["rope_layout"] = "interleaved" if _get(hf, arch, "rope_interleave") else "rotate-half"
    if kind == "yarn":
        if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
            raise HFConversionError("YaRN with attention_factor or truncate=false is not supported: the zoo derives "
                                    "the attention factor from mscale and mscale_all_dim, as DeepSeek-V3 does")
        if params.get("factor") is None:
            raise HFConversionError("YaRN without a factor in rope_parameters is not supported")
        out["yarn"] = {zoo: float(params[key]) if key != "original_max_position_embeddings" else int(params[key])
                       for key, zoo in YARN_KEYS.items() if params.get(key) is not None}
    return out


def _sliding_window(hf: dict[str, Any], arch: Arch) -> Optional[int]:
    if arch.sliding == "plain":
        window = hf.get("sliding_window", arch.defaults.get("sliding_window"))
        return int(window) if window else None
    if arch.sliding == "qwen" and hf.get("use_sliding_window"):
        types = hf.get("layer_types")
        if types and all(t == "full_attention" for t in types):
            return None
        if types and all(t == "sliding_attention" for t in types) and hf.get("sliding_window"):
            return int(hf["sliding_window"])
        raise HFConversionError(f"use_sliding_window=true with {'layer_types ' + str(types) if types else 'max_window_layers'}: "
                                "the zoo applies one attention window to every layer, so only all-full or all-sliding "
                                "layer_types import")
    return None


def _declaring(kind: str, attribute: str) -> list[tuple[str, Any]]:
    """The registered plugins of ``kind`` that declare a transformers counterpart (``attribute``), by name."""
    return [(name, cls) for name in REGISTRY.names(kind) if getattr(cls := REGISTRY.get(kind, name), attribute, None)]


def _strategy_for(arch: Arch) -> tuple[str, dict[str, Any]]:
    """The norm strategy (and its options) whose declared transformers layout is ``arch``'s: the same two norms
    (``hf_norms``), and q/k norms of the same width (``hf_qk_options``) or none."""
    for name, cls in _declaring("norm strategy", "hf_norms"):
        if sorted(cls.hf_norms.values()) != sorted(arch.norms):
            continue
        if arch.qk_width is None and not cls.qkv_norm:
            return name, {}
        if arch.qk_width is not None and arch.qk_width in getattr(cls, "hf_qk_options", {}):
            return name, dict(cls.hf_qk_options[arch.qk_width])
    raise HFConversionError(f"no installed norm strategy declares {arch.hf_class}'s layout (norms {', '.join(arch.norms)}"
                            f"{', q/k norms ' + arch.qk_width + ' width' if arch.qk_width else ''}) in its hf_norms")


def _one(kind: str, attribute: str, what: str) -> tuple[str, Any]:
    found = _declaring(kind, attribute)
    if not found:
        raise HFConversionError(f"no installed {kind} declares {what} ({attribute})")
    return found[0]


def _attention_for(arch: Arch) -> tuple[str, Any]:
    """The attention whose declared transformers modules (``hf_names``) are ``arch``'s: latent (DeepSeek's
    ``kv_b_proj``) or standard (``k_proj``)."""
    module = "kv_b_proj" if arch.latent else "k_proj"
    for name, cls in _declaring("attention", "hf_names"):
        if any(module in hf for hf in cls.hf_names.values()):
            return name, cls
    raise HFConversionError(f"no installed attention declares transformers' {module} in its hf_names")


def _deepseek_config(hf: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """The MLA options and MoE section of a DeepSeek-V3 config.json."""
    eps = float(_get(hf, arch, "rms_norm_eps"))
    if eps != LATENT_EPS:
        raise HFConversionError(f"rms_norm_eps={eps}: transformers' DeepseekV3 normalizes its q and kv latents at eps "
                                f"{LATENT_EPS} and its layers at rms_norm_eps, and the zoo uses one eps for both")
    if hf.get("attention_bias"):
        raise HFConversionError("attention_bias=true is not supported: the zoo's latent attention has no biases")
    if int(hf.get("num_key_value_heads") or hf["num_attention_heads"]) != int(hf["num_attention_heads"]):
        raise HFConversionError("num_key_value_heads != num_attention_heads: latent attention has no KV head groups")
    q_rank = hf.get("q_lora_rank", arch.defaults["q_lora_rank"])
    options = {"kv_lora_rank": int(_get(hf, arch, "kv_lora_rank")), "q_lora_rank": int(q_rank) if q_rank else None,
               **{k: int(_get(hf, arch, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}}
    router_name, router = _one("router", "hf_bias_name", "DeepSeek's sigmoid routing with a balancing bias")
    E, shared = int(_get(hf, arch, "n_routed_experts")), int(_get(hf, arch, "n_shared_experts") or 0)
    moe = {"num_experts": E, "top_k": int(_get(hf, arch, "num_experts_per_tok")),
           "hidden_size": int(_get(hf, arch, "moe_intermediate_size")), "router": router_name,
           "router_options": {"renormalize": bool(_get(hf, arch, "norm_topk_prob")),
                              "route_scale": float(_get(hf, arch, "routed_scaling_factor")),
                              "n_group": int(_get(hf, arch, "n_group")), "topk_group": int(_get(hf, arch, "topk_group"))},
           "shared_experts": shared, "first_dense_layers": int(_get(hf, arch, "first_k_dense_replace")),
           "lb_weight": 0.0, "z_weight": 0.0}
    return {"options": options, "moe": moe}


def hf_to_config(hf: dict[str, Any], tensors: Optional[dict[str, torch.Tensor]] = None) -> tuple[Arch, ModelConfig]:
    """The zoo config of an HF ``config.json``; ``tensors`` (prefix-free names) settle the biases."""
    model_type = hf.get("model_type")
    arch = ARCHS.get(model_type)  # type: ignore[arg-type]
    if arch is None:
        raise HFConversionError(f"cannot import model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFConversionError(f"hidden_act {act!r} is not supported: the zoo's FFN is SwiGLU (silu)")
    if arch.bias_key == "attention_bias" and hf.get("mlp_bias"):
        raise HFConversionError("mlp_bias=true is not supported: the zoo's SwiGLU has no biases")
    if hf.get("clip_qkv") is not None:
        raise HFConversionError(f"clip_qkv={hf['clip_qkv']} is not supported: the zoo does not clip q/k/v")
    d, n_layers, heads = (int(_get(hf, arch, k)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim") or (arch.defaults.get("head_dim") if arch.head_dim_key else None) or d // heads
    if arch.bias_key is None:
        qkv_bias = False
    elif tensors is not None:
        qkv_bias = "layers.0.self_attn.q_proj.bias" in tensors
    else:
        qkv_bias = bool(_get(hf, arch, arch.bias_key) if arch.bias_key in arch.defaults else hf.get(arch.bias_key))
    strategy, strategy_options = _strategy_for(arch)
    attention_name, attention = _attention_for(arch)
    cfg: dict[str, Any] = {
        "d_model": d, "n_layers": n_layers, "n_heads": heads, "n_kv_heads": kv_heads,
        "head_dim": int(head_dim) if int(head_dim) * heads != d else None,
        "vocab_size": int(_get(hf, arch, "vocab_size")),
        "max_seq_len": int(_get(hf, arch, "max_position_embeddings")),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_strategy": strategy, "norm_options": strategy_options,
        "norm_layer": _one("norm layer", "hf_rms_norm", "transformers' RMSNorm")[0],
        "norm_eps": float(_get(hf, arch, "rms_norm_eps")),
        "attention": {"type": attention_name, **_rope(hf, arch), "sliding_window": _sliding_window(hf, arch),
                      "options": dict(attention.hf_bias_options) if qkv_bias else {}},
    }
    if arch.latent:
        deepseek = _deepseek_config(hf, arch)
        cfg["n_kv_heads"] = None
        cfg["attention"]["options"] = deepseek["options"]
        cfg["ffn"] = {"type": "moe", "hidden_size": int(_get(hf, arch, "intermediate_size"))}
        cfg["moe"] = deepseek["moe"]
        return arch, merge_config(cfg, where=f"{model_type} config.json")
    if not arch.moe:
        cfg["ffn"] = {"type": "dense", "hidden_size": int(_get(hf, arch, "intermediate_size"))}
        return arch, merge_config(cfg, where=f"{model_type} config.json")
    if arch.sparse_layers_keys:
        step, dense_layers = int(hf.get("decoder_sparse_step", 1) or 1), hf.get("mlp_only_layers") or []
        if step != 1 or dense_layers:
            raise HFConversionError(f"decoder_sparse_step={step}, mlp_only_layers={dense_layers}: some layers are dense; "
                                    "the zoo imports only models whose every layer is MoE")
    E = int(hf.get("num_local_experts") or _get(hf, arch, "num_experts"))
    k = int(_get(hf, arch, "num_experts_per_tok"))
    width = int(hf["moe_intermediate_size"]) if "moe_intermediate_size" in hf else int(_get(hf, arch, "intermediate_size"))
    renormalize = arch.renormalize if arch.renormalize is not None else bool(hf.get("norm_topk_prob", False))
    coef = float(_get(hf, arch, "router_aux_loss_coef"))
    router_name, router = _one("router", "hf_renormalize_option", "transformers' softmax top-k routing")
    moe: dict[str, Any] = {"num_experts": E, "top_k": k, "hidden_size": width, "router": router_name,
                           "router_options": {router.hf_renormalize_option: renormalize}, "lb_weight": coef * k / n_layers,
                           "z_weight": 0.0, "jitter": float(hf.get(arch.jitter_key) or 0.0) if arch.jitter_key else 0.0}
    if arch.shared_expert:
        shared = int(_get(hf, arch, "shared_expert_intermediate_size"))
        if shared <= 0:
            raise HFConversionError("shared_expert_intermediate_size must be positive")
        moe.update(shared_experts=1, shared_hidden_size=shared, shared_gate=True)
    cfg["ffn"] = {"type": "moe"}
    cfg["moe"] = moe
    return arch, merge_config(cfg, where=f"{model_type} config.json")


def _fused_to_per_expert(tensors: dict[str, torch.Tensor], arch: Arch) -> None:
    """transformers 5's in-memory layout (``mlp.experts.gate_up_proj (E, 2F, H)``, ``down_proj (E, H, F)``,
    ``mlp.gate.weight``) to the per-expert layout of Hub checkpoints, in place."""
    for name in [n for n in tensors if n.endswith("mlp.experts.gate_up_proj")]:
        layer = name[: -len("mlp.experts.gate_up_proj")]
        gate_up = tensors.pop(name)
        down = tensors.pop(layer + "mlp.experts.down_proj", None)
        if down is None:
            raise HFConversionError(f"{name} is present but {layer}mlp.experts.down_proj is not")
        F = gate_up.shape[1] // 2
        prefix = layer + ("block_sparse_moe." if arch.mixtral_names else "mlp.")
        names = ("w1", "w3", "w2") if arch.mixtral_names else ("gate_proj", "up_proj", "down_proj")
        for e in range(gate_up.shape[0]):
            tensors[f"{prefix}experts.{e}.{names[0]}.weight"] = gate_up[e, :F]
            tensors[f"{prefix}experts.{e}.{names[1]}.weight"] = gate_up[e, F:]
            tensors[f"{prefix}experts.{e}.{names[2]}.weight"] = down[e]
        if arch.mixtral_names and layer + "mlp.gate.weight" in tensors:
            tensors[prefix + "gate.weight"] = tensors.pop(layer + "mlp.gate.weight")


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        out[name[len("model."):] if name.startswith("model.") else name] = t
    return out


def hf_to_state_dict(arch: Arch, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The zoo state dict of ``cfg`` from HF tensors (prefix-free names); every tensor must be used."""
    tensors = dict(tensors)
    _fused_to_per_expert(tensors, arch)
    state: dict[str, torch.Tensor] = {}
    for pair in _pairs(arch, cfg):
        missing = [n for n in pair.hf if n not in tensors]
        if missing:
            raise HFConversionError(f"the checkpoint lacks {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                    + f", needed for the zoo's {pair.zoo}")
        parts = [tensors.pop(n) for n in pair.hf]
        parts = [p.t() for p in parts] if pair.t else parts
        state[pair.zoo] = torch.cat(parts, 0).contiguous() if len(parts) > 1 else parts[0]
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not torch.equal(head, state["embed.weight"]):
            raise HFConversionError("tie_word_embeddings=true but lm_head.weight differs from the embeddings")
    for name in [n for n in tensors if n.endswith(("self_attn.o_proj.bias", "rotary_emb.inv_freq"))]:
        t = tensors.pop(name)
        if name.endswith("o_proj.bias") and bool(t.any()):
            raise HFConversionError(f"{name} is not zero: the zoo's attention has no output-projection bias")
    if tensors:
        names = sorted(tensors)
        raise HFConversionError(f"the checkpoint has tensors the zoo does not map: {', '.join(names[:5])}"
                                + (f" (and {len(names) - 5} more)" if len(names) > 5 else ""))
    return state


def _check_distinct(source: Path, out: Path) -> None:
    if out.expanduser().resolve() == source.expanduser().resolve():
        raise HFConversionError(f"the output folder {out} is the source folder; both hold a model.safetensors, so "
                                "converting in place would overwrite the source: choose another --to folder")


def _target_dtype(state: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    counts = Counter(t.dtype for t in state.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def from_hf(path_or_repo: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[torch.dtype] = None) -> Path:
    """Import an HF Llama / Mistral / Mixtral / Qwen2-MoE / OLMoE / Qwen3(-MoE) / OLMo-2 / FlexOlmo model.

    Writes ``out_dir/model.safetensors`` (a zoo checkpoint; ``zoo.load`` it) and ``out_dir/config.yaml``
    and returns the checkpoint path. ``dtype`` casts the weights (default: the checkpoint's own)."""
    folder = hf_folder(path_or_repo)
    _check_distinct(folder, Path(out_dir))
    hf = _read_hf_config(folder)
    tensors = _strip_prefix(_read_hf_tensors(folder))
    arch, cfg = hf_to_config(hf, tensors)
    state = hf_to_state_dict(arch, cfg, tensors)
    target = _target_dtype(state, dtype)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model = empty_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: the checkpoint gives {list(state[k].shape)}, the config needs {list(shape)}"
                for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    problems += [f"missing {k}" for k in expected if k not in state]
    if problems:
        raise HFConversionError(f"{folder}: the weights do not match config.json: " + "; ".join(problems[:3]))
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save(model, out / WEIGHTS_NAME)
    source = str(path_or_repo)
    (out / ZOO_CONFIG_NAME).write_text(f"# imported from Hugging Face {arch.hf_class} ({source}) by `zoo convert --from-hf`\n"
                                     + cfg.to_yaml())
    return ckpt


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _attention_bias(cfg: ModelConfig) -> bool:
    """Whether the attention's options are those its plugin declares for transformers' q/k/v biases."""
    parts = resolve(cfg)
    declared = getattr(parts.attention, "hf_bias_options", None) or {}
    return bool(declared) and all(getattr(parts.attention_options, k, None) == v for k, v in declared.items())


def _renormalizes(cfg: ModelConfig) -> bool:
    """Whether the router renormalizes its top-k gates (by the option its plugin names for that)."""
    router = REGISTRY.get("router", cfg.moe.router)
    options = resolve_options(router.Options, cfg.moe.router_options, "moe.router_options", f"router {cfg.moe.router!r}")
    return bool(getattr(options, router.hf_renormalize_option))


def _qk_width(cfg: ModelConfig) -> Optional[str]:
    """The width of layer 0's q/k norms (None without), read from the strategy as built, as it may set them
    from its options; anything but q and k alone has no transformers counterpart."""
    parts = resolve(cfg)
    with torch.device("meta"):
        strategy = parts.strategy(cfg, 0, parts.make_norm, parts.strategy_options)
    if not strategy.qkv_norm:
        return None
    return strategy.qkv_norm_width if set(strategy.qkv_norm) == {"q", "k"} else "qkv"


def export_arch(cfg: ModelConfig, name: str = "this variant") -> Arch:
    """The transformers architecture that computes exactly what ``cfg`` does, or a clear refusal. The plugins say
    what they are in transformers' terms (``hf_norms`` and ``hf_missing``, ``hf_rms_norm``, ``hf_names``,
    ``hf_renormalize_option``); nothing here knows them by name."""
    def _refuse(why: str) -> HFConversionError:
        return HFConversionError(f"{name} ({cfg.norm_strategy}, {'MoE' if cfg.is_moe else 'dense'}) has no Hugging "
                                 f"Face transformers equivalent: {why}")

    parts = resolve(cfg)
    hf_norms = getattr(parts.strategy, "hf_norms", None)
    if not hf_norms:
        raise _refuse(getattr(parts.strategy, "hf_missing", None)
                      or f"norm strategy {cfg.norm_strategy!r} declares no transformers layout (hf_norms)")
    final = cfg.final_norm if cfg.final_norm is not None else parts.strategy.final_norm
    embed = cfg.embed_norm if cfg.embed_norm is not None else parts.strategy.embed_norm
    if not getattr(REGISTRY.get("norm layer", cfg.norm_layer), "hf_rms_norm", False) or cfg.norm_layer_options:
        raise _refuse(f"its norm layer is {cfg.norm_layer!r} {dict(cfg.norm_layer_options) or ''}; the matching "
                      "transformers architectures use RMSNorm with a gain only")
    if not final or embed:
        raise _refuse("it changes final_norm / embed_norm; transformers decoders always end with a final norm "
                      "and never normalize the embeddings")
    if not getattr(parts.attention, "hf_names", None):
        raise _refuse(f"attention {cfg.attention.type!r} declares no transformers counterpart (hf_names)")
    qkv_bias, window, qk = _attention_bias(cfg), cfg.attention.sliding_window, _qk_width(cfg)
    pre, out = sorted(hf_norms.values()) == sorted(PRE), sorted(hf_norms.values()) == sorted(OUT)
    layout = f"norms {', '.join(hf_norms.values())}, {'q/k norms ' + qk + ' width' if qk else 'no q/k norms'}"
    latent = any("kv_b_proj" in hf for hf in parts.attention.hf_names.values())
    if latent or cfg.attention.rope_layout != "rotate-half" or cfg.attention.yarn.factor != 1:
        _check_deepseek(cfg, pre and qk is None, _refuse)
        return ARCHS["deepseek_v3"]
    if cfg.is_moe:
        moe = cfg.moe
        if not getattr(REGISTRY.get("router", moe.router), "hf_renormalize_option", None):
            raise _refuse(f"router {moe.router!r}: the transformers MoE architectures route by softmax top-k, which "
                          "this router does not declare (hf_renormalize_option)")
        if moe.shared_experts:
            if not (pre and qk is None) or not moe.shared_gate:
                raise _refuse("shared experts exist in transformers only as Qwen2-MoE's, which is pre-norm and "
                              "gates the shared expert (moe.shared_gate=true)")
            arch = ARCHS["qwen2_moe"]
        elif pre and qk is None:
            if not _renormalizes(cfg):
                option = REGISTRY.get("router", moe.router).hf_renormalize_option
                raise _refuse("Mixtral, the pre-norm MoE without shared experts, renormalizes its top-k gates and "
                              f"this variant does not (moe.router_options.{option}=false); set it to true, or use a "
                              "placement with full-width (OLMoE) or per-head (Qwen3-MoE) QK-norm")
            arch = ARCHS["mixtral"]
        elif pre and qk in ("full", "head"):
            arch = ARCHS["olmoe"] if qk == "full" else ARCHS["qwen3_moe"]
        elif out and qk == "full":
            arch = ARCHS["flex_olmo"]
        else:
            raise _refuse(f"its layout ({layout}) is no transformers MoE architecture's")
    elif pre and qk is None:
        arch = ARCHS["mistral"] if window is not None else ARCHS["llama"]
    elif pre and qk == "head":
        arch = ARCHS["qwen3"]
    elif pre and qk == "full":
        raise _refuse("full-width QK-norm exists in transformers only in MoE models (OLMoE) and with "
                      "OLMo-2's output norms")
    elif out and qk == "full":
        arch = ARCHS["olmo2"]
    else:
        raise _refuse(f"its layout ({layout}) is no transformers architecture's")
    if window is not None and arch.sliding != "plain":
        raise _refuse(f"attention.sliding_window={window}: {arch.hf_class} has no sliding window "
                      "(Mistral and Mixtral do)")
    if qkv_bias and arch.bias_key is None:
        raise _refuse(f"its attention has q/k/v biases: {arch.hf_class} has no attention biases")
    if not arch.head_dim_key and cfg.head_size * cfg.n_heads != cfg.d_model:
        raise _refuse(f"head size {cfg.head_size} with {cfg.n_heads} heads != d_model {cfg.d_model}; "
                      f"{arch.hf_class} derives the head size as hidden_size / num_attention_heads")
    return arch


def _check_deepseek(cfg: ModelConfig, pre_norm: bool, refuse: Any) -> None:
    """Raise ``refuse(why)`` unless ``cfg`` is exactly what transformers' DeepseekV3 computes."""
    attention = resolve(cfg).attention
    if not any("kv_b_proj" in hf for hf in attention.hf_names.values()):
        raise refuse("interleaved RoPE and YaRN exist in transformers with latent attention (DeepseekV3) only")
    moe = cfg.moe
    router = REGISTRY.get("router", moe.router) if cfg.is_moe else None
    problems = [
        (not pre_norm, "DeepseekV3 is pre-norm without q/k norms"),
        (not cfg.is_moe, "DeepseekV3 has MoE layers after its first_k_dense_replace dense ones; set ffn.type=moe"),
        (router is not None and not getattr(router, "hf_bias_name", None),
         f"router {moe.router!r}: DeepseekV3 routes by sigmoid scores with a balancing bias (hf_bias_name)"),
        (cfg.is_moe and (moe.shared_gate or (moe.shared_hidden_size not in (None, moe.shared_experts * moe.hidden_size))),
         "DeepseekV3's shared experts are ungated, moe.shared_experts x moe.hidden_size wide"),
        (cfg.attention.sliding_window is not None, "DeepseekV3 has no sliding window"),
        (cfg.norm_eps != LATENT_EPS, f"DeepseekV3 normalizes its latents at eps {LATENT_EPS}; set norm_eps={LATENT_EPS}"),
        (cfg.attention.yarn.factor != 1 and cfg.attention.yarn.original_max_seq_len is None,
         "YaRN needs attention.yarn.original_max_seq_len"),
    ]
    for bad, why in problems:
        if bad:
            raise refuse(why)


def _deepseek_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The DeepseekV3 keys of ``config.json`` for ``cfg``."""
    built = empty_model(cfg).blocks[0].attn
    moe = cfg.moe
    options = resolve_options(REGISTRY.get("router", moe.router).Options, moe.router_options, "moe.router_options",
                              f"router {moe.router!r}")
    yarn = cfg.attention.yarn
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.attention.rope_theta}
    if yarn.factor != 1:
        rope.update(rope_type="yarn", **{hf: getattr(yarn, zoo) for hf, zoo in YARN_KEYS.items()})
    return {
        "kv_lora_rank": built.kv_rank, "q_lora_rank": built.q_rank, "qk_nope_head_dim": built.nope,
        "qk_rope_head_dim": built.rope_dim, "v_head_dim": built.v_dim, "head_dim": built.rope_dim,
        "rope_interleave": cfg.attention.rope_layout == "interleaved", "rope_parameters": rope,
        "num_key_value_heads": cfg.n_heads, "attention_bias": False, "intermediate_size": cfg.ffn.hidden_size,
        "moe_intermediate_size": moe.hidden_size, "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.shared_experts, "first_k_dense_replace": moe.first_dense_layers,
        "norm_topk_prob": options.renormalize, "routed_scaling_factor": options.route_scale,
        "n_group": options.n_group, "topk_group": options.topk_group, "num_nextn_predict_layers": 0,
    }


def config_to_hf(arch: Arch, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of ``arch`` for ``cfg``."""
    qkv_bias = _attention_bias(cfg)
    hf: dict[str, Any] = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.attention.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.attention.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if arch.latent:
        hf.pop("rope_theta")
        return {**hf, **_deepseek_to_hf(cfg)}
    if arch.head_dim_key:
        hf["head_dim"] = cfg.head_size
    if arch.bias_key == "attention_bias":
        hf["attention_bias"] = qkv_bias
    elif arch.bias_key == "qkv_bias":
        hf["qkv_bias"] = True  # Qwen2-MoE always had them (transformers 4 has no switch): zeros when the zoo has none
    if arch.bias_key == "attention_bias" and arch.model_type == "llama":
        hf["mlp_bias"] = False
    if arch.sliding == "plain":
        hf["sliding_window"] = cfg.attention.sliding_window
    elif arch.sliding == "qwen":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if arch.model_type != "qwen3_moe":  # the others derive per-layer attention types
            hf["layer_types"] = ["full_attention"] * cfg.n_layers
    if not cfg.is_moe:
        hf["intermediate_size"] = cfg.ffn.hidden_size
        return hf
    moe = cfg.moe
    hf.update(num_experts_per_tok=moe.top_k, output_router_logits=False,
              router_aux_loss_coef=moe.lb_weight * cfg.n_layers / moe.top_k)
    if arch.mixtral_names:
        hf.update(num_local_experts=moe.num_experts, intermediate_size=moe.hidden_size, router_jitter_noise=moe.jitter)
    else:
        hf.update(num_experts=moe.num_experts, norm_topk_prob=_renormalizes(cfg))
    if arch.sparse_layers_keys:
        hf.update(moe_intermediate_size=moe.hidden_size, decoder_sparse_step=1, mlp_only_layers=[],
                  intermediate_size=moe.shared_hidden_size or moe.hidden_size * moe.top_k)
    elif not arch.mixtral_names:
        hf["intermediate_size"] = moe.hidden_size
    if arch.shared_expert:
        hf["shared_expert_intermediate_size"] = moe.shared_hidden_size or moe.shared_experts * moe.hidden_size
    if arch.model_type == "olmoe":
        hf["clip_qkv"] = None
    return hf


def state_dict_to_hf(arch: Arch, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors (with the ``model.`` prefix, per-expert layout) from a zoo state dict."""
    state = dict(state)
    if arch.shared_expert and cfg.moe.shared_hidden_size is None:
        cfg = merge_config(cfg, {"moe": {"shared_hidden_size": cfg.moe.shared_experts * cfg.moe.hidden_size}})
    hf_cfg, bias = cfg, _attention_bias(cfg)
    if arch.bias_key == "qkv_bias" and not bias:  # Qwen2-MoE always has q/k/v biases: write zeros
        attention = resolve(cfg).attention
        module = next(m for m, hf in attention.hf_names.items() if "q_proj" in hf)
        for i in range(cfg.n_layers):
            w = state[f"blocks.{i}.attn.{module}.weight"]
            state[f"blocks.{i}.attn.{module}.bias"] = w.new_zeros(w.shape[0])
        hf_cfg = merge_config(cfg, {"attention": {"options": dict(attention.hf_bias_options)}})
    out: dict[str, torch.Tensor] = {}
    for pair in _pairs(arch, hf_cfg):
        t = state.pop(pair.zoo)
        parts = t.split(list(pair.sizes), 0) if pair.sizes else [t]
        for name, p in zip(pair.hf, parts):
            out[("" if name == "lm_head.weight" else "model.") + name] = (p.t() if pair.t else p).contiguous().clone()
    if arch.bias_key == "attention_bias" and bias:
        for i in range(cfg.n_layers):  # these architectures put a bias on o_proj too: zero, as the zoo has none
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.d_model, dtype=out["model.norm.weight"].dtype)
    if state:
        raise HFConversionError(f"zoo tensors with no place in {arch.hf_class}: {', '.join(sorted(state)[:5])}")
    return out


def _write_hf_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    for stale in [out / WEIGHTS_NAME, out / HF_INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    shards = split_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out / HF_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def to_hf(source: Union[str, Path, ModelSource], out_dir: Union[str, Path], *, overrides: ConfigSource = None,
          dtype: Optional[torch.dtype] = None, max_shard_bytes: int = HF_SHARD_BYTES, pretrained: bool = False) -> Path:
    """Export a zoo model, named as every command names one (zoo/sources.py: a variant is exported freshly
    initialized), as a transformers model folder.

    Writes ``out_dir/config.json`` and ``out_dir/model.safetensors`` (shards plus an index above
    ``max_shard_bytes``) and returns ``out_dir``. Raises ``HFConversionError`` for variants that no
    transformers architecture computes, before any weights are read."""
    src = source if isinstance(source, ModelSource) else resolve_source(source, pretrained=pretrained)
    if src.checkpoint is not None:
        cfg, _ = checkpoint_config(src.checkpoint)
        if overrides is not None:
            cfg = merge_config(cfg, overrides, where="overrides")
        _check_distinct(src.checkpoint.parent, Path(out_dir))
    else:
        cfg = get_config(src.text, overrides)
    arch = export_arch(cfg, src.text)
    model = load_source(src, overrides)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    target = _target_dtype(state, dtype)
    tensors = {k: v.to(target) if v.is_floating_point() else v
               for k, v in state_dict_to_hf(arch, model.cfg, state).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_hf_weights(tensors, out, max_shard_bytes)
    (out / HF_CONFIG_NAME).write_text(json.dumps(config_to_hf(arch, model.cfg, target), indent=2) + "\n")
    return out


__all__ = ["ARCHS", "Arch", "HFConversionError", "config_to_hf", "export_arch", "from_hf",
           "hf_folder", "hf_to_config", "hf_to_state_dict", "state_dict_to_hf", "to_hf"]
