"""Flax models: no training logic, no hooks, no global state."""
from askd_jax.models.features import Features
from askd_jax.models.heads import ArcFace, CosFace, MarginModel, make_margin
from askd_jax.models.iresnet import IResNetCBAM, iresnet_cbam

__all__ = ["Features", "ArcFace", "CosFace", "MarginModel", "make_margin", "IResNetCBAM",
           "iresnet_cbam"]
