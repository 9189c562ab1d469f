"""Distillation losses, one module each."""
from td_ray.distill.losses.contrastive import ContrastiveLoss
from td_ray.distill.losses.kl_divergence import KLDistillationLoss
from td_ray.distill.losses.margin_mse import MarginMSELoss

__all__ = ["ContrastiveLoss", "KLDistillationLoss", "MarginMSELoss"]
