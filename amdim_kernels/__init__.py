"""amdim-kernels: fused, memory-lean AMDIM / Deep InfoMax contrastive losses for PyTorch."""
from . import compat
from .modules import MixtureNCELoss, NCELoss
from .nce import fused_mixture_nce_loss, fused_nce_loss
from .reference import mixture_nce_loss_reference, nce_loss_reference

__all__ = ["fused_nce_loss", "nce_loss_reference", "fused_mixture_nce_loss",
           "mixture_nce_loss_reference", "compat", "NCELoss", "MixtureNCELoss"]
__version__ = "0.2.0"
