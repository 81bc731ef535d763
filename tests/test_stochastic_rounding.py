"""Stochastic rounding of bf16 parameter writes: reference, Triton kernels and optimizers."""

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt import AdamW8bit, SGDSaI
from memopt.functional.rounding import stochastic_round_to_bf16


def _neighbours(x):
    down = x.to(torch.bfloat16)  # RNE: one neighbour; the other is one ulp away
    bits = x.view(torch.int32) & -65536
    lo = bits.view(torch.float32)
    hi = (bits + 65536).view(torch.float32)
    return lo, hi, down


def test_reference_rounds_to_a_neighbour_and_is_unbiased():
    x = torch.full((4096,), 1.0) + torch.linspace(0, 2**-8, 4096)  # between bf16 neighbours of 1.0
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_round_to_bf16(x, g).float() for _ in range(200)])
    lo, hi, _ = _neighbours(x)
    assert torch.all((draws == lo) | (draws == hi))
    assert (draws.mean(0) - x).abs().max() < 0.25 * (hi - lo).max()


MAKERS = {
    "sgdsai_ref": lambda ps, sr: SGDSaI(ps, lr=1e-4, momentum=0.0, weight_decay=0.0, scale="sqrt_numel",
                                        stochastic_rounding=sr),
    "sgdsai_triton": lambda ps, sr: SGDSaI(ps, lr=1e-4, momentum=0.0, weight_decay=0.0, scale="sqrt_numel",
                                           stochastic_rounding=sr, use_triton=True),
    "sgdsai_8bit_triton": lambda ps, sr: SGDSaI(ps, lr=1e-4, weight_decay=0.0, scale="sqrt_numel",
                                                stochastic_rounding=sr, state_bits=8, min_8bit_size=256,
                                                use_triton=True),
    "adamw_8bit_triton": lambda ps, sr: AdamW8bit(ps, lr=2e-4, weight_decay=0.0, stochastic_rounding=sr,
                                                  min_8bit_size=256, use_triton=True),
}


@pytest.mark.parametrize("name", MAKERS)
def test_tiny_updates_move_bf16_weights_only_with_stochastic_rounding(name):
    # every step moves each weight by ~1/40-1/80 of a bf16 ulp at 1.0: round-to-nearest loses it, SR keeps it
    def drift(dtype, sr):
        p = torch.nn.Parameter(torch.ones(1024, dtype=dtype, device=DEV))
        opt = MAKERS[name]([p], sr)
        for _ in range(64):
            p.grad = torch.full((1024,), -1.0 / 32, dtype=dtype, device=DEV)
            opt.step()
        return p.detach().float().mean().item() - 1.0

    torch.manual_seed(0)
    exact = drift(torch.float32, False)
    assert exact > 0
    assert drift(torch.bfloat16, False) == 0.0  # nearest rounding: every update vanishes
    assert abs(drift(torch.bfloat16, True) - exact) < 0.2 * exact  # unbiased: the drift survives


def test_flag_is_validated():
    with pytest.raises(ValueError, match="stochastic_rounding"):
        SGDSaI([torch.nn.Parameter(torch.ones(2))], stochastic_rounding="yes")
