"""The toolbox of plugin authors: the ops and helpers the built-in plugins use, public for every plugin.

Each op takes the zoo's fast path where one applies and its plain PyTorch reference elsewhere
(zoo/kernels; ``ZOO_KERNELS=reference`` keeps everything on the references), so a plugin written with
these runs as fast as the built-ins and as plainly under the reference switch:

- ``Linear`` / ``linear``: ``nn.Linear`` / ``F.linear`` on each CPU's fastest GEMM at the model's precision.
- ``rms_norm(x, weight, eps)``: RMSNorm in fp32, in ``x``'s dtype.
- ``Rope``: rotary embedding as the config sets it (rotate-half or interleaved pairing, YaRN), its tables
  and rotation; ``rope_tables`` / ``rope_tables_at`` and ``apply_rope``: plain rotate-half RoPE.
- ``attention(q, k, v, allowed=None, scale=None)``: causal (or masked) scaled-dot-product attention, GQA
  included; ``allowed_keys``: the keys each query may see during generation (mask, sliding window).
- ``swiglu(gate_up)``: ``silu(gate) * up`` of a fused projection.
- ``LayerCache``, ``max_logit``: the KV cache of generation, and the largest attention logit the trainer logs.
"""
from .kernels.linear import Linear, linear
from .kernels.rms_norm import rms_norm
from .kernels.sdpa import attention
from .kernels.swiglu import swiglu
from .model import LayerCache, Rope, allowed_keys, apply_rope, max_logit, rope_tables, rope_tables_at

__all__ = ["LayerCache", "Linear", "Rope", "allowed_keys", "apply_rope", "attention", "linear", "max_logit", "rms_norm",
           "rope_tables", "rope_tables_at", "swiglu"]
