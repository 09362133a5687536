"""Every fast path in ``zoo.kernels.KERNELS`` against its plain reference, and the one switch between them.

Driven by the registry: a kernel is tested the moment it is registered, in every dtype it serves,
values and the gradients of every input that takes one.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.kernels import KERNELS, mode, reference, use

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
CASES = [(name, dtype) for name, kernel in sorted(KERNELS.items()) for dtype in kernel.dtypes]


def _run(fn, args):
    out = fn(*args)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(upstream)
    return out.detach(), [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def test_every_kernel_is_listed():
    """The fast paths the zoo has: a new one must be registered (and so tested) to be used."""
    assert set(KERNELS) >= {"linear", "causal_attention", "cross_entropy", "rms_norm", "rope", "swiglu",
                            "moe_grouped_glu", "moe_fused_glu"}


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in CASES])
def test_kernel_matches_its_reference(name, dtype):
    kernel = KERNELS[name]
    fast_out, fast_grads = _run(kernel.fast, kernel.example(dtype))
    ref_out, ref_grads = _run(kernel.reference, kernel.example(dtype))
    assert fast_out.dtype == ref_out.dtype == (torch.float32 if name == "cross_entropy" else dtype)
    torch.testing.assert_close(fast_out.float(), ref_out.float(), **TOLERANCE[dtype])
    assert fast_grads and len(fast_grads) == len(ref_grads)
    for got, want in zip(fast_grads, ref_grads):
        assert got is not None and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def _custom_functions(loss: torch.Tensor) -> set[str]:
    """Names of the custom autograd.Function nodes in the graph behind ``loss``."""
    seen, stack, found = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return found


@pytest.mark.parametrize("variant", ["tiny-dense-hybridnorm", "tiny-moe-hybridnorm-star", "tiny-moe-olmo2"])
def test_the_reference_switch_leaves_no_custom_function_in_a_training_step(variant):
    """Under ``zoo.kernels.reference()`` a training step's graph is plain PyTorch; by default it holds the
    fast paths (so this test can tell the two apart), and both give the same loss."""
    torch.manual_seed(0)
    model = zoo.build(variant, ["max_seq_len=320"])
    idx = torch.randint(0, 256, (2, 300))  # past one attention block: the fast causal attention applies
    losses = {}
    for choice in ("fast", "reference"):
        with use(choice):
            out = model(idx, targets=idx.roll(-1, 1))
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
            found = _custom_functions(loss)
            losses[choice] = float(loss.detach())
            loss.backward()
        assert (found == set()) == (choice == "reference"), (choice, found)
    assert losses["fast"] == pytest.approx(losses["reference"], rel=1e-4)


def test_the_switch_reads_the_environment_and_nests(monkeypatch):
    monkeypatch.delenv("ZOO_KERNELS", raising=False)
    assert mode() == "fast"
    with reference():
        assert mode() == "reference"
        with use("fast"):
            assert mode() == "fast"
        assert mode() == "reference"
    monkeypatch.setenv("ZOO_KERNELS", "reference")
    assert mode() == "reference"
    monkeypatch.setenv("ZOO_KERNELS", "fastest")
    with pytest.raises(zoo.ConfigError, match="ZOO_KERNELS='fastest': use fast or reference"):
        mode()
    with pytest.raises(zoo.ConfigError, match="zoo.kernels.use='slow': use fast or reference"):
        with use("slow"):
            pass


def test_zoo_kernels_reference_in_a_process_trains_on_plain_pytorch(subprocess_env):
    code = ("import torch, zoo\nfrom zoo.kernels import mode\nassert mode() == 'reference'\n"
            "m = zoo.build('tiny-moe-hybridnorm')\nx = torch.randint(0, 256, (2, 32))\n"
            "o = m(x, targets=x)\n(o.loss + o.aux_loss).backward()\nprint(mode(), float(o.loss))")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(ZOO_KERNELS="reference"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("reference ")


PLACEMENT_TESTS = ["tests/test_norm_strategies.py", "tests/test_hybridnorm_reference.py", "tests/test_attention.py",
                   "tests/test_moe_routers.py", "tests/test_moe_losses.py", "tests/test_moe_variants.py",
                   "tests/test_moe_hf_parity.py", "tests/test_variants.py", "tests/test_generate.py",
                   "tests/test_kernels.py::test_kernel_matches_its_reference"]


def test_every_placement_passes_on_the_references(subprocess_env):
    """The equation, parity and forward/backward tests of every placement, attention and router, run again in a
    process with ``ZOO_KERNELS=reference``: the plain model computes what the fast one does."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *PLACEMENT_TESTS],
                       env=subprocess_env(ZOO_KERNELS="reference"), cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0, r.stdout[-3000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed > 200 and "failed" not in summary, summary
