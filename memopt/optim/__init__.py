"""memopt optimizers: one algorithm family per module."""

from memopt.optim.sgdsai import SGDSaI

__all__ = ["SGDSaI"]
