"""Fused AdamW 8-bit kernel vs its PyTorch twin, on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from conftest import KERNEL_DEVICE as DEV
from memopt.functional import adamw as ref
from memopt.kernels import adamw as tri

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _reference_and_fused(shape, p0, grads, weight_decay):
    """Both updates from zero 8-bit state over ``grads``: [(param, state, state after the first step)] for each."""
    from memopt.functional.quantize import layout_8bit

    out = []
    for impl in (ref, tri):
        p = p0.clone()
        state = [torch.zeros(s, dtype=d, device=DEV) for key in ("m", "v")
                 for s, d in layout_8bit(key, shape, 256).values()]
        first = None
        for t, gr in enumerate(grads):
            impl.adamw_update_8bit_(p, gr, *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=weight_decay, step=t + 1)
            first = first or [x.clone() for x in state]
        out.append((p, state, first))
    return out


def _assert_agree(out, dtype):
    (p_r, s_r, _), (p_t, s_t, _) = out
    torch.testing.assert_close(p_t, p_r, **TOL[dtype])
    for i in (0, 2):
        diff = (s_t[i].int() - s_r[i].int()).abs()
        assert diff.max() <= 1 and (diff != 0).float().mean() < 0.02
    for i in (1, 3):
        torch.testing.assert_close(s_t[i], s_r[i], atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1,), (255,), (257,), (4097,), (3, 300), (2, 3, 100), (64, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_adamw_8bit_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    p0 = (torch.randn(shape, generator=g) * 0.5).to(DEV, dtype)
    grads = [(torch.randn(shape, generator=g) * 1e-2).to(DEV, dtype) for _ in range(4)]
    _assert_agree(_reference_and_fused(shape, p0, grads, 0.01), dtype)


@pytest.mark.parametrize("shape", [(4097,), (64, 300)])
def test_fused_adamw_8bit_reads_a_second_moment_stored_as_0_as_the_reference(shape):
    g = torch.Generator().manual_seed(3)
    p0 = (torch.randn(shape, generator=g) * 0.5).to(DEV)
    first = torch.randn(shape, generator=g) * 1e-2
    first.view(-1)[::97] = 100.0  # its blocks store the other v on the zero code, their m not
    grads = [first.to(DEV)] + [(torch.randn(shape, generator=g) * 1e-2).to(DEV) for _ in range(2)]
    out = _reference_and_fused(shape, p0, grads, 0.0)
    m_codes, _, v_codes, _ = out[0][2]
    assert int(((v_codes == 0) & (m_codes != 127)).sum()) > 100  # the read map is exercised from step 2 on
    _assert_agree(out, torch.float32)
