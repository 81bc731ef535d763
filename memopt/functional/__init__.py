"""Plain-PyTorch optimizer math: the reference for every kernel and the CPU path."""

from memopt.functional.sgdsai import gsnr, sgdsai_update_, sgdsai_update_foreach_

__all__ = ["gsnr", "sgdsai_update_", "sgdsai_update_foreach_"]
