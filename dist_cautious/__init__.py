"""dist_cautious: cautious optimizers (C-AdamW, C-Lion, C-SGD) with an exact per-tensor factor
under FSDP1/FSDP2, HSDP, TP, DDP and DeepSpeed ZeRO."""

from .base import FORMULAS, SCALES, CautiousOptimizer
from .optim import CSGD, CAdamW, CLion

__all__ = ["CAdamW", "CLion", "CSGD", "CautiousOptimizer", "FORMULAS", "SCALES"]
__version__ = "0.1.0"
