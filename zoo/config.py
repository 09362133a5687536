"""Model configs: dataclasses (the schema), merged with omegaconf from YAML, mappings and dotlists.

The schema is documented field by field in docs/config.md; a test keeps the two in step.
Component names (``norm_strategy``, ``norm_layer``, ``attention.type``, ``moe.router``) are
registry names resolved through the plugins; each component's ``*_options`` mapping is checked
against that component's own ``Options`` dataclass.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

MOE_BACKENDS = ("auto", "megablocks", "fused", "grouped_mm", "loop")


@dataclass
class YarnConfig:
    factor: float = 1.0  # 1: plain RoPE
    original_max_seq_len: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class AttentionConfig:
    type: str = "mha"
    rope_theta: float = 10000.0
    rope_layout: str = "rotate-half"
    yarn: YarnConfig = field(default_factory=YarnConfig)
    sliding_window: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FFNConfig:
    type: str = "dense"
    hidden_size: int = 512


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 256
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    shared_experts: int = 0
    shared_hidden_size: Optional[int] = None  # the shared expert's width; None: shared_experts * hidden_size
    shared_gate: bool = False  # scale the shared output by sigmoid(shared_gate(x)), Linear(d, 1) (Qwen2-MoE)
    lb_weight: float = 0.01
    z_weight: float = 0.001
    jitter: float = 0.0
    lb_scope: str = "local"  # "global": the LB loss's expert shares f_i and router statistics over all ranks
    first_dense_layers: int = 0  # the first N layers keep the dense FFN (ffn.hidden_size), DeepSeek's first_k_dense_replace


@dataclass
class InitConfig:
    std: Optional[float] = None
    cutoff_factor: float = 3.0
    scale_residual: bool = True
    head_std: Optional[float] = None


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: int = 256
    max_seq_len: int = 512
    tie_embeddings: bool = True
    norm_strategy: str = "prenorm"
    norm_options: dict[str, Any] = field(default_factory=dict)
    norm_layer: str = "rmsnorm"
    norm_layer_options: dict[str, Any] = field(default_factory=dict)
    norm_eps: float = 1e-5
    final_norm: Optional[bool] = None
    embed_norm: Optional[bool] = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init: InitConfig = field(default_factory=InitConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def init_std(self) -> float:
        """The paper's SmallInit sigma = sqrt(2 / (5 d)) unless ``init.std`` overrides it."""
        return self.init.std if self.init.std is not None else math.sqrt(2.0 / (5.0 * self.d_model))

    @property
    def is_moe(self) -> bool:
        return self.ffn.type == "moe"

    def ffn_type(self, layer: int) -> str:
        """Layer ``layer``'s FFN, "dense" or "moe": ``ffn.type``, but dense in the first ``moe.first_dense_layers``."""
        return "dense" if not self.is_moe or layer < self.moe.first_dense_layers else "moe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


ConfigSource = Union[str, Path, Mapping, Sequence[str], ModelConfig, DictConfig, None]


def _suggest(key: str, node: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_at(key: str) -> Any:
    """The dataclass that owns the parent of a dotted key, for suggestions."""
    node: Any = ModelConfig
    for part in key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    return node


def _non_mapping_section(layer: DictConfig) -> str:
    """The top-level key whose schema is a section but whose given value is not a mapping."""
    sections = {f.name for f in dataclasses.fields(ModelConfig) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]
    for key in layer:
        if key in sections and not isinstance(layer[key], DictConfig):
            return str(key)
    return "?"


def _as_omegaconf(source: ConfigSource, where: str) -> DictConfig:
    if source is None:
        return OmegaConf.create({})
    if isinstance(source, ModelConfig):
        return OmegaConf.structured(source)
    if isinstance(source, DictConfig):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping, not {type(loaded).__name__}")
        return loaded
    if isinstance(source, Mapping):
        return OmegaConf.create(dict(source))
    if isinstance(source, Sequence) and not isinstance(source, str):
        items = list(source)
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} in {where} is not of the form KEY=VALUE (e.g. norm_strategy=prenorm)")
        try:
            return OmegaConf.from_dotlist(items)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {items}: {e.msg if hasattr(e, 'msg') else e}") from None
        except Exception as e:  # YAML's own errors for a value such as !tag
            raise ConfigError(f"cannot parse overrides {items}: {str(e).splitlines()[0]}") from None
    raise ConfigError(f"{where}: expected a YAML path, a mapping or a list of KEY=VALUE strings, got {type(source).__name__}")


def merge_config(*sources: ConfigSource, where: str = "config") -> ModelConfig:
    """Merge config sources in order over the schema defaults; errors name the offending key."""
    merged = OmegaConf.structured(ModelConfig)
    for source in sources:
        layer = _as_omegaconf(source, where)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", "") or "") or _non_mapping_section(layer)
            msg = (getattr(e, "msg", None) or str(e) or type(e).__name__).splitlines()[0]
            if "not in" in msg:
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, _schema_at(key))}; see docs/config.md") from None
            if msg.startswith("Merge error"):
                msg = f"it is a section, not a value; set its keys instead, e.g. {key}.<key>=VALUE"
            raise ConfigError(f"invalid value for config key {key!r}: {msg}") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    check_shapes(cfg)
    return cfg


def check_shapes(cfg: ModelConfig) -> None:
    """Reject configs whose sizes cannot build, naming the keys involved."""
    positive = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
                "max_seq_len": cfg.max_seq_len, "ffn.hidden_size": cfg.ffn.hidden_size, "norm_eps": cfg.norm_eps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in (("head_dim", cfg.head_dim), ("n_kv_heads", cfg.n_kv_heads)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive or null, got {value}")
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ConfigError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads}), or set head_dim")
    if cfg.kv_heads <= 0 or cfg.n_heads % cfg.kv_heads:
        raise ConfigError(f"n_heads ({cfg.n_heads}) must be a positive multiple of n_kv_heads ({cfg.kv_heads})")
    if cfg.head_size % 2:
        raise ConfigError(f"the head size ({cfg.head_size}) must be even for RoPE; set head_dim or n_heads")
    if cfg.attention.sliding_window is not None and cfg.attention.sliding_window <= 0:
        raise ConfigError(f"attention.sliding_window must be positive or null, got {cfg.attention.sliding_window}")
    yarn = cfg.attention.yarn
    if yarn.factor < 1 or (yarn.factor > 1 and (yarn.original_max_seq_len is None or yarn.original_max_seq_len <= 0)):
        raise ConfigError(f"attention.yarn.factor must be >= 1 (1: plain RoPE), and above 1 needs a positive "
                          f"attention.yarn.original_max_seq_len; got factor {yarn.factor}, original_max_seq_len "
                          f"{yarn.original_max_seq_len}")
    if cfg.ffn.type not in ("dense", "moe"):
        raise ConfigError(f"ffn.type must be 'dense' or 'moe', got {cfg.ffn.type!r}")
    if cfg.is_moe:
        moe = cfg.moe
        if moe.num_experts <= 0 or moe.hidden_size <= 0 or moe.shared_experts < 0:
            raise ConfigError("moe.num_experts and moe.hidden_size must be positive and moe.shared_experts >= 0")
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(f"moe.top_k ({moe.top_k}) must be between 1 and moe.num_experts ({moe.num_experts})")
        if moe.shared_hidden_size is not None and (moe.shared_hidden_size <= 0 or not moe.shared_experts):
            raise ConfigError(f"moe.shared_hidden_size ({moe.shared_hidden_size}) must be positive and needs "
                              "moe.shared_experts >= 1 (it sets the shared expert's width)")
        if moe.shared_gate and not moe.shared_experts:
            raise ConfigError("moe.shared_gate=true gates the shared expert; set moe.shared_experts >= 1 too")
        if not 0 <= moe.first_dense_layers < cfg.n_layers:
            raise ConfigError(f"moe.first_dense_layers ({moe.first_dense_layers}) must lie in [0, n_layers) "
                              f"(n_layers={cfg.n_layers}); an MoE model keeps at least one MoE layer")
        if moe.lb_scope not in ("local", "global"):
            raise ConfigError(f"moe.lb_scope must be 'local' (each rank's micro-batch) or 'global' (all ranks); "
                              f"got {moe.lb_scope!r}")
        if moe.backend not in MOE_BACKENDS:
            raise ConfigError(f"moe.backend must be one of {', '.join(MOE_BACKENDS)}; got {moe.backend!r}")


def resolve_options(options_cls: Optional[type], raw: Mapping[str, Any], key: str, owner: str) -> Any:
    """Check a component's ``*_options`` mapping against its ``Options`` dataclass and build it."""
    raw = dict(raw or {})
    if options_cls is None:
        if raw:
            raise ConfigError(f"{key} given ({', '.join(raw)}) but {owner} takes no options")
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_cls), raw)
    except OmegaConfBaseException as e:
        sub = str(getattr(e, "full_key", "") or "")
        msg = (getattr(e, "msg", None) or str(e) or type(e).__name__).splitlines()[0]
        if "not in" in msg:
            names = [f.name for f in dataclasses.fields(options_cls)]
            close = difflib.get_close_matches(sub, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown option {key}.{sub} for {owner}{hint}; it takes: {', '.join(names) or 'nothing'}") from None
        raise ConfigError(f"invalid value for {key}.{sub} ({owner}): {msg}") from None
    return OmegaConf.to_object(merged)


def config_differences(a: ModelConfig, b: ModelConfig, ignore: tuple[str, ...] = ("init.", "moe.backend")) -> list[str]:
    """``key: A vs B`` for each config key whose value differs between ``a`` and ``b`` (dotted keys; those starting
    with an ``ignore`` prefix, which leave a trained model's parameters and outputs alone, are skipped)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and not k.startswith(ignore)]
