"""Mixture-of-Experts: routing contract, dropless experts on three backends, aux losses."""
from .experts import BACKENDS, Experts, ExpertWeights, grouped_glu_dispatch, loop_glu
from .layer import MoEAux, MoEFFN, after_optimizer_step
from .losses import load_balancing_loss, z_loss
from .router import Router, Routing, softmax_topk

__all__ = ["BACKENDS", "ExpertWeights", "Experts", "MoEAux", "MoEFFN", "Router", "Routing", "after_optimizer_step",
           "grouped_glu_dispatch", "load_balancing_loss", "loop_glu", "softmax_topk", "z_loss"]
