"""Every reachable variant of the Triton kernels compiled for sm_80 and sm_90 on this machine (Triton ships ptxas),
held to the budgets of docs/8bit.md: it compiles, keeps registers under MAX_REGISTERS with nothing spilled, and
issues no more instructions per element than the H200 allows at 85% of its memory bandwidth."""

import pytest

from memopt.kernels import sass
from memopt.kernels._common import MAX_REGISTERS


@pytest.fixture(scope="module")
def compiled():
    """All variants for both targets, compiled once (in parallel: about two minutes on two cores when Triton's
    cache is cold, seconds when warm)."""
    rows = sass.compile_all()
    assert len(rows) == len(sass.variants()) * len(sass.ARCHS)
    return rows


KERNELS = sorted({v.kernel for v in sass.variants()})


def test_the_variants_cover_every_kernel_and_blocksize():
    from memopt.kernels import adamw, quantize, sgdsai

    launched = {k.fn.__name__ for k in (adamw._adamw_8bit_kernel, quantize._quantize_blockwise_kernel,
                                        quantize._dequantize_blockwise_kernel, sgdsai._sgdsai_kernel,
                                        sgdsai._sgdsai_8bit_kernel)}
    assert set(KERNELS) == launched
    labels = [v.label for v in sass.variants() if v.kernel == "_sgdsai_8bit_kernel"]
    assert {f"bs={b} " for b in sass.BLOCKSIZES} <= {lab[lab.index("bs="):lab.index(" ", lab.index("bs=")) + 1]
                                                      for lab in labels}
    assert any("+sr" in lab for lab in labels) and any("rows=True" in lab for lab in labels)


@pytest.mark.parametrize("arch", [f"sm_{a}" for a in sass.ARCHS])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_compiles_within_its_budgets(compiled, kernel, arch):
    rows = [r for r in compiled if r["kernel"] == kernel and r["arch"] == arch]
    assert rows
    over = [f"{r['variant']}: {r['per_element']} > {r['budget']} instructions/element" for r in rows
            if r["per_element"] > r["budget"]]
    heavy = [f"{r['variant']}: {r['registers']} registers" for r in rows if r["registers"] > MAX_REGISTERS]
    spilled = [f"{r['variant']}: {r['spilled_bytes']} B spilled" for r in rows if r["spilled_bytes"]]
    assert not (over or heavy or spilled), "\n".join(over + heavy + spilled)


def test_the_budget_refuses_a_binary_search_kernel():
    """The check can fail: the earlier design of the 8-bit update (binary search, one block per program) needs
    about twice the instructions per element that the bandwidth allows."""
    types = {"p_ptr": "*bf16", "g_ptr": "*bf16", "codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
             "mids_ptr": "*fp32", "n": "i32"}
    from binary_search_kernel import binary_search_8bit_kernel as fn

    v = sass.Variant("binary_search_8bit_kernel", "bf16 bs=256", "binary_search_kernel",
                     sass._signature(fn, types, {"BLOCK": 256}), {"BLOCK": 256}, 4, 2, 3 * 2 + 2 + 8 / 256)
    (row,) = sass.compile_all([90], workers=1, only=[v])
    assert row["per_element"] > 1.5 * row["budget"], row
