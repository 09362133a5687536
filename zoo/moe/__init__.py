"""Mixture-of-Experts, along its seams: the router contract, token dispatch, dropless experts on
several backends, the MoE FFN layer and its aux losses."""
from .dispatch import Dispatch, sort_by_expert
from .experts import BACKENDS, Experts, ExpertWeights
from .layer import MoEAux, MoEFFN, after_optimizer_step
from .losses import load_balancing_loss, z_loss
from .router import Router, RouterContext, Routing, softmax_topk

__all__ = ["BACKENDS", "Dispatch", "ExpertWeights", "Experts", "MoEAux", "MoEFFN", "Router", "RouterContext", "Routing",
           "after_optimizer_step", "load_balancing_loss", "softmax_topk", "sort_by_expert", "z_loss"]
