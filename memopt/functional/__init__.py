"""Plain-PyTorch optimizer math: the reference for every kernel and the CPU path."""

from memopt.functional.quantize import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from memopt.functional.sgdsai import gsnr, sgdsai_update_, sgdsai_update_8bit_, sgdsai_update_foreach_

__all__ = [
    "create_dynamic_map",
    "dequantize_blockwise",
    "gsnr",
    "quantize_blockwise",
    "sgdsai_update_",
    "sgdsai_update_8bit_",
    "sgdsai_update_foreach_",
]
