"""Built-in variants: the HybridNorm paper's configurations at full size, tiny CPU variants, and a
ladder of sizes between them.

Every tiny variant exists dense and MoE for every built-in norm strategy, with matched active
parameters (see variant_configs/tiny-moe.yaml). The ladder (about 20M, 150M and 550M active
parameters) exists dense and MoE, matched the same way, for the paper's three placements; other
placements reach its sizes through ``--set norm_strategy=...``. ``extra`` says what the experiments take by
default: ``study`` (the placements `zoo study` compares, in this order; the first is the baseline of
its paired differences), ``label`` (a placement's name in reports), ``paper`` (what the paper claims of
the placement against the baseline, which the study's report checks) and ``compare`` (what `zoo
compare` trains).
"""
from __future__ import annotations

from pathlib import Path

import zoo
from zoo import Variant

CONFIGS = Path(__file__).parent / "variant_configs"
TINY_STRATEGIES = ("prenorm", "postnorm", "hybridnorm", "hybridnorm-star", "mixln", "periln", "qknorm", "olmo2", "deepnorm")
STUDY = {"prenorm": "Pre-Norm", "postnorm": "Post-Norm", "mixln": "Mix-LN", "hybridnorm": "HybridNorm",
         "hybridnorm-star": "HybridNorm*"}  # in the order of the study's tables and plots; the first is its baseline
PAPER_CLAIMS = ("hybridnorm", "hybridnorm-star")  # the paper reports these below Pre-Norm in loss
COMPARE = ("hybridnorm", "prenorm")
LADDER = {"20m": "about 20M", "150m": "about 150M", "550m": "about 550M"}
LADDER_STRATEGIES = ("prenorm", "hybridnorm", "hybridnorm-star")
PAPER = {
    "olmo2-1b": ("dense 1.2B (OLMo-2-1B shape)", ("hybridnorm", "hybridnorm-star", "prenorm")),
    "olmoe-1b-7b": ("MoE 1B-active / 7B-total (OLMoE-1B-7B shape)", ("hybridnorm-star", "prenorm")),
}


def _extra(strategy: str) -> dict[str, object]:
    study = {"study": list(STUDY).index(strategy), "label": STUDY[strategy]} if strategy in STUDY else {}
    if strategy in PAPER_CLAIMS:
        study["paper"] = "lower loss"
    return {**study, **({"compare": True} if strategy in COMPARE else {})}


@zoo.hookimpl
def register_variants(register):
    for shape, (what, strategies) in PAPER.items():
        for strategy in strategies:
            register(f"{shape}-{strategy}", Variant(
                config=[CONFIGS / f"{shape}.yaml", {"norm_strategy": strategy}],
                description=f"The HybridNorm paper's {what} with {strategy} placement.",
                tags=("paper",)))
    for size, active in LADDER.items():
        for kind in ("dense", "moe"):
            for strategy in LADDER_STRATEGIES:
                register(f"ladder-{size}-{kind}-{strategy}", Variant(
                    config=[CONFIGS / f"ladder-{size}.yaml", {"norm_strategy": strategy, "ffn": {"type": kind}}],
                    description=f"The ladder's {'MoE' if kind == 'moe' else 'dense'} model of {active} active "
                                f"parameters with {strategy} placement.", tags=("ladder",)))
    for kind in ("dense", "moe"):
        for strategy in TINY_STRATEGIES:
            register(f"tiny-{kind}-{strategy}", Variant(
                config=[CONFIGS / f"tiny-{kind}.yaml", {"norm_strategy": strategy}],
                description=f"Tiny {'MoE' if kind == 'moe' else 'dense'} CPU variant with {strategy} placement"
                            + (" (active parameters matched to the tiny dense variant)." if kind == "moe" else "."),
                tags=("tiny",), extra=_extra(strategy)))
