"""memopt optimizers: one algorithm family per module."""

from memopt.optim._checks import keep_32bit_state
from memopt.optim.adamw import AdamW8bit
from memopt.optim.frugal import FRUGAL, GaLoreAdamW
from memopt.optim.lion import Lion
from memopt.optim.sgdsai import SGDSaI
from memopt.optim.snsm import SubsetNormSM

__all__ = ["AdamW8bit", "FRUGAL", "GaLoreAdamW", "Lion", "SGDSaI", "SubsetNormSM", "keep_32bit_state"]
