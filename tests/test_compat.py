"""What was written or taught before the layout by concern keeps working: checkpoints saved by 0.1.0,
the old module paths (with a DeprecationWarning naming the new home) and the run state of old runs."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zoo

DATA = Path(__file__).parent / "data"
OLD = ["tiny-moe-hybridnorm-star", "tiny-dense-olmo2"]


@pytest.mark.parametrize("name", OLD)
def test_a_checkpoint_saved_by_0_1_loads_and_computes_what_it_computed(name):
    """Saved by hybridnorm-zoo 0.1.0 (commit 9956725, before the redesign) with the logits and loss it gave;
    the names of its strategy's norms and attention's Q/K/V norms are the ones the plugins still make."""
    path = DATA / f"{name}-zoo-0.1.0.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["zoo_version"] == "0.1.0"
    model = zoo.load(path).eval()
    expected = load_file(DATA / f"{name}-zoo-0.1.0-expected.safetensors")
    out = model(expected["idx"], targets=expected["idx"].roll(-1, 1))
    torch.testing.assert_close(out.logits, expected["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], atol=1e-6, rtol=1e-6)
    assert model.variant == name
    norms = {k for k in model.state_dict() if ".strategy." in k or "_norm." in k}
    assert norms and norms <= set(load_file(path))


@pytest.mark.parametrize("old, name, new", [
    ("zoo.attention", "LayerCache", "zoo.nn"), ("zoo.attention", "max_logit", "zoo.nn"),
    ("zoo.attention", "Attention", "zoo.model"), ("zoo.sdpa", "causal_attention", "zoo.kernels.sdpa"),
    ("zoo.linear", "Linear", "zoo.kernels.linear"), ("zoo.linear", "compute_dtype", "zoo.kernels.gemm"),
    ("zoo.evaluate", "evaluate", "zoo.train.evaluate"), ("zoo.tokenizer", "tokenizer_for", "zoo.train.tokenizer"),
    ("zoo.data", "load_corpus", "zoo.train.data"), ("zoo.convert", "to_hf", "zoo.interop.hf"),
])
def test_old_module_paths_import_with_a_deprecation_warning(old, name, new):
    import importlib
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import {name} from {new}"):
        moved = getattr(module, name)
    assert moved is getattr(importlib.import_module(new), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(f"from {new} import {name}")  # the new home warns nothing
    with pytest.raises(AttributeError, match=f"module '{old}' .* has no attribute 'nothing_here'"):
        getattr(module, "nothing_here")


def test_the_run_state_of_an_older_run_resumes(tmp_path):
    """0.1 wrote ``best_val`` into the run state, a field that is gone; its trainer state still loads."""
    from zoo.train.optim import make_optimizer
    from zoo.train.state import RunState, load_trainer_state, save_trainer_state
    from zoo.train.trainer import TrainConfig

    model = zoo.build("tiny-dense-prenorm")
    opt = make_optimizer(model, TrainConfig())
    path = tmp_path / "trainer.safetensors"
    save_trainer_state(path, opt, RunState(step=7, tokens=70, wall=1.5, loss_ema=2.5))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    run = json.loads(meta["run"])
    save_file(load_file(path), path, metadata={**meta, "run": json.dumps({**run, "best_val": None})})
    assert load_trainer_state(path, opt) == RunState(step=7, tokens=70, wall=1.5, loss_ema=2.5)
