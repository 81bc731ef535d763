"""memopt optimizers: one algorithm family per module."""

from memopt.optim.sgdsai import SGDSaI, keep_32bit_state

__all__ = ["SGDSaI", "keep_32bit_state"]
