"""Every registered built-in through the plugin conformance kit (``zoo.testing``), parametrized from the
registry: a plugin is checked the moment it is registered. The in-process checks run here; the checks that
start other processes or compile run in the slow job. A guard keeps an independent reference test beside
each built-in, since the kit checks that a plugin fits the contract, not that it computes its equations."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from zoo.testing import FAST, SLOW, parametrize_with_checks, registered, run_checks

TESTS = Path(__file__).parent
BUILTINS = registered(plugin="zoo.*")
PLUGINS = [s for s in BUILTINS if s.kind != "variant"]

# Each built-in's own test against equations written in the test (or an oracle): kind -> name -> test.
REFERENCE = {
    "norm strategy": {
        **{name: "test_norm_strategies.py::test_strategy_matches_reference" for name in
           ("prenorm", "postnorm", "mixln", "periln", "sandwich", "qknorm", "olmo2", "deepnorm")},
        "hybridnorm": "test_hybridnorm_reference.py::test_hybridnorm_matches_section_1_1",
        "hybridnorm-star": "test_hybridnorm_reference.py::test_hybridnorm_star_matches_section_1_3",
    },
    "norm layer": {"rmsnorm": "test_norm_strategies.py::test_rmsnorm_layer_fp32_math_and_eps",
                   "layernorm": "test_norm_strategies.py::test_layernorm_layer",
                   "dyt": "test_norm_strategies.py::test_dyt_layer_and_alpha_init"},
    "attention": {"mha": "test_attention.py::test_attention_module_matches_reference",
                  "mla": "test_latent_attention.py::test_mla_matches_the_equations"},
    "router": {"topk": "test_moe_routers.py::test_topk_matches_softmax_topk",
               "switch": "test_moe_routers.py::test_switch_capacity_keeps_each_experts_first_tokens",
               "sigmoid-bias": "test_deepseek.py::test_group_limited_routing_matches_the_reference",
               "sinkhorn": "test_moe_routers.py::test_sinkhorn_training_selects_topk_of_the_balanced_plan",
               "expert-choice": "test_moe_routers.py::test_expert_choice_each_expert_takes_exactly_capacity",
               "hash": "test_deepseek.py::test_hash_router_routes_by_token_id_through_the_router_context"},
    "variant": {"tiny-dense-*": "test_variants.py::test_tiny_dense_builds_trains_and_counts",
                "tiny-moe-*": "test_moe_variants.py::test_tiny_moe_builds_trains_and_counts",
                "ladder-*": "test_variants.py::test_the_ladder_says_its_size_and_matches_dense_and_moe",
                "olmo2-1b-*": "test_full_size_stats.py::test_paper_variant_sizes",
                "olmoe-1b-7b-*": "test_full_size_stats.py::test_paper_variant_sizes"},
}


VARIANT_FAST = ("options", "meta_init", "forward_backward")  # a variant is its plugins' wiring; the rest run slow


@parametrize_with_checks(PLUGINS, FAST)
def test_builtin(check):
    check()


@parametrize_with_checks([s for s in BUILTINS if s.kind == "variant"], VARIANT_FAST)
def test_builtin_variant(check):
    check()


@pytest.mark.slow
@parametrize_with_checks([s for s in BUILTINS if s.kind == "variant"], [c for c in FAST if c not in VARIANT_FAST])
def test_builtin_variant_more(check):
    check()


@pytest.mark.slow
@parametrize_with_checks(PLUGINS, SLOW)
def test_builtin_isolated(check):
    check()


def _defines(target: str) -> bool:
    file, function = target.split("::")
    tree = ast.parse((TESTS / file).read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == function for node in ast.walk(tree))


def test_every_builtin_has_an_independent_reference_test():
    assert len(PLUGINS) >= 21 and any(s.kind == "variant" for s in BUILTINS)
    for subject in BUILTINS:
        table = REFERENCE[subject.kind]
        targets = [t for pattern, t in table.items() if fnmatch.fnmatchcase(subject.name, pattern)]
        assert targets, f"built-in {subject.id} has no reference test in REFERENCE: write one, then list it"
        assert all(_defines(t) for t in targets), targets
    names = {s.name for s in BUILTINS}
    stale = [p for kind in REFERENCE.values() for p in kind if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    assert not stale, f"REFERENCE lists names no built-in registers: {stale}"


def test_the_kit_ids_are_kind_name_check():
    mark = parametrize_with_checks(["attention:mla"], ["options", "kv_cache"])
    assert [p.id for p in mark.args[1]] == ["attention:mla-options", "attention:mla-kv_cache"]
    router = parametrize_with_checks(["hash"], FAST)
    assert "router:hash-kv_cache" not in [p.id for p in router.args[1]]  # a router never touches the cache


def test_a_worker_past_its_time_fails_its_checks_with_the_reason(monkeypatch):
    from zoo.testing import isolated
    monkeypatch.setattr(isolated, "TIMEOUT", 0.5)
    (outcome,) = run_checks(["prenorm"], ["ddp"])
    assert outcome.status == "failed" and outcome.message == (
        "dense: the ddp worker failed: it did not finish within 0.5 s; "
        "moe: the ddp worker failed: it did not finish within 0.5 s")
