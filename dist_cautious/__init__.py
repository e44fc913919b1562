"""dist_cautious: Cautious AdamW with an exact per-tensor factor under FSDP2, HSDP, DDP and ZeRO."""

from .optim import FORMULAS, SCALES, CAdamW

__all__ = ["CAdamW", "FORMULAS", "SCALES"]
__version__ = "0.1.0"
