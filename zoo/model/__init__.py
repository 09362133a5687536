"""The readable transformer: plain PyTorch modules from token ids to logits, and generation.

Read in this order: ``model.py`` (the model and its block), ``strategy.py`` (where a block's norms
sit), ``attention.py`` (the attention contract and its Q/K/V-norm helper), ``rope.py``, ``ffn.py``,
``init.py``, ``cache.py`` and ``generate.py``, ``stats.py``. The ops they call live in zoo/kernels,
each with its plain reference.
"""
from .attention import Attention, allowed_keys, max_logit
from .cache import KVCache, LayerCache
from .ffn import SwiGLU
from .generate import GenerationError, generate, stream
from .init import Init
from .model import Block, Components, ModelOutput, ZooModel
from .rope import Rope, Yarn, apply_rope, rope_tables, rope_tables_at
from .stats import ModelStats, count_params, forward_flops, kv_cache_bytes_per_token
from .strategy import MakeNorm, NormStrategy, Sublayer

__all__ = ["Attention", "Block", "Components", "GenerationError", "Init", "KVCache", "LayerCache", "MakeNorm",
           "ModelOutput", "ModelStats", "NormStrategy", "Rope", "Sublayer", "SwiGLU", "Yarn", "ZooModel", "allowed_keys",
           "apply_rope", "count_params", "forward_flops", "generate", "kv_cache_bytes_per_token", "max_logit",
           "rope_tables", "rope_tables_at", "stream"]
