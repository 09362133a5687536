"""Every fast path of the zoo, each beside its plain PyTorch reference, behind one switch.

A kernel is a fused or hand-written op (a custom ``autograd.Function``, a oneDNN call) that computes
what its reference computes in ordinary PyTorch. Each module here holds one op: its reference, its
fast path and the op itself, which takes the fast path where that applies and the reference
elsewhere (``gemm.py`` holds the GEMM choice they share). ``ZOO_KERNELS=reference`` (or
``with zoo.kernels.reference():``) puts every op on its reference, so that a model then runs on plain
PyTorch alone. ``KERNELS`` lists every fast path with example inputs; tests/test_kernels.py checks
each against its reference, values and gradients.
"""
from . import cross_entropy, linear, moe_glu, rms_norm, rope, sdpa, swiglu  # noqa: F401  (each registers its kernels)
from .switch import ENV, KERNELS, Kernel, fast, mode, reference, use

__all__ = ["ENV", "KERNELS", "Kernel", "fast", "mode", "reference", "use"]
