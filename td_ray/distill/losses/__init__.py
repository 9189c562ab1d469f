"""Distillation losses, one module each."""
from td_ray.distill.losses.kl_divergence import KLDistillationLoss

__all__ = ["KLDistillationLoss"]
