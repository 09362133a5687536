"""Built-in variants: the HybridNorm paper's configurations at full size, and tiny CPU variants.

Every tiny variant exists dense and MoE for every built-in norm strategy, with matched active
parameters (see variant_configs/tiny-moe.yaml).
"""
from __future__ import annotations

from pathlib import Path

import zoo
from zoo import Variant

CONFIGS = Path(__file__).parent / "variant_configs"
TINY_STRATEGIES = ("prenorm", "postnorm", "hybridnorm", "hybridnorm-star", "mixln", "periln", "qknorm", "olmo2", "deepnorm")
PAPER = {
    "olmo2-1b": ("dense 1.2B (OLMo-2-1B shape)", ("hybridnorm", "hybridnorm-star", "prenorm")),
    "olmoe-1b-7b": ("MoE 1B-active / 7B-total (OLMoE-1B-7B shape)", ("hybridnorm-star", "prenorm")),
}


@zoo.hookimpl
def register_variants(register):
    for shape, (what, strategies) in PAPER.items():
        for strategy in strategies:
            register(f"{shape}-{strategy}", Variant(
                config=[CONFIGS / f"{shape}.yaml", {"norm_strategy": strategy}],
                description=f"The HybridNorm paper's {what} with {strategy} placement.",
                tags=("paper",)))
    for kind in ("dense", "moe"):
        for strategy in TINY_STRATEGIES:
            register(f"tiny-{kind}-{strategy}", Variant(
                config=[CONFIGS / f"tiny-{kind}.yaml", {"norm_strategy": strategy}],
                description=f"Tiny {'MoE' if kind == 'moe' else 'dense'} CPU variant with {strategy} placement"
                            + (" (active parameters matched to the tiny dense variant)." if kind == "moe" else "."),
                tags=("tiny",)))
