"""Checks of the Triton kernels that need a GPU, run by benchmarks/gpu_session.sh (each as its own process).

    python benchmarks/gpu_checks.py parity --out DIR    # 4096x11008: kernels vs the PyTorch reference on the GPU
    python benchmarks/gpu_checks.py memcheck            # small odd sizes x blocksizes 16/256/2048/8192 (run it
                                                        # under compute-sanitizer --tool memcheck)
    python benchmarks/gpu_checks.py profile --out DIR   # one torch.profiler pass over the 8-bit SGD-SaI kernel
    add --dry-run for the same on CPU under TRITON_INTERPRET=1 with small sizes

``parity`` writes parity.csv: per kernel and stochastic-rounding setting, after 5 steps from the same start, the
fraction of 8-bit codes that differ from the reference's, whether the block maxima are equal, and the largest
parameter difference (absolute, and relative to the largest parameter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _common import RowWriter


def _update(kernel: str, impl, p, g, state, sr: bool, step: int, blocksize: int = 256):
    if kernel == "sgdsai_8bit":
        impl.sgdsai_update_8bit_(p, g, *state, lr=1e-2, scale=0.5, momentum=0.9, weight_decay=0.01,
                                 first_step=step == 1, blocksize=blocksize, stochastic_rounding=sr)
    else:
        impl.adamw_update_8bit_(p, g, *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step,
                                blocksize=blocksize, stochastic_rounding=sr)


def _state(kernel: str, shape, device, blocksize: int = 256):
    from memopt.functional.quantize import layout_8bit

    keys = ("m",) if kernel == "sgdsai_8bit" else ("m", "v")
    return [torch.zeros(s, dtype=d, device=device) for k in keys for s, d in layout_8bit(k, shape, blocksize).values()]


def _impls(kernel: str):
    from memopt.functional import adamw, sgdsai
    from memopt.kernels import adamw as k_adamw
    from memopt.kernels import sgdsai as k_sgdsai

    return (sgdsai, k_sgdsai) if kernel == "sgdsai_8bit" else (adamw, k_adamw)


def parity(device, shape, out: Path) -> None:
    writer = RowWriter(out / "parity", ["kernel", "dtype", "stochastic_rounding", "shape", "codes_differing",
                                        "codes_max_step", "absmax_equal", "param_max_abs_diff",
                                        "param_max_rel_diff", "device"])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    for kernel in ("sgdsai_8bit", "adamw_8bit"):
        for dtype, sr in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            gen = torch.Generator().manual_seed(0)
            p0 = (torch.randn(shape, generator=gen) * 0.02).to(device, dtype)
            grads = [(torch.randn(shape, generator=gen) * 1e-3).to(device, dtype) for _ in range(5)]
            results = []
            for impl in _impls(kernel):
                torch.manual_seed(1)
                p, state = p0.clone(), _state(kernel, shape, device)
                for t, g in enumerate(grads, start=1):
                    _update(kernel, impl, p, g, state, sr, t)
                results.append((p.float(), state))
            (p_r, s_r), (p_k, s_k) = results
            codes = [(a.int() - b.int()).abs() for a, b in zip(s_k[::2], s_r[::2])]
            row = {"kernel": kernel, "dtype": str(dtype)[6:], "stochastic_rounding": sr,
                   "shape": "x".join(map(str, shape)),
                   "codes_differing": f"{sum(int((c != 0).sum()) for c in codes) / sum(c.numel() for c in codes):.3e}",
                   "codes_max_step": max(int(c.max()) for c in codes),
                   "absmax_equal": all(torch.equal(a, b) for a, b in zip(s_k[1::2], s_r[1::2])),
                   "param_max_abs_diff": f"{float((p_k - p_r).abs().max()):.3e}",
                   "param_max_rel_diff": f"{float((p_k - p_r).abs().max() / p_r.abs().max()):.3e}", "device": name}
            writer.write(row)
            print(row, flush=True)


def memcheck(device, sizes) -> None:
    """Every kernel once on small odd sizes and 2-D shapes with partial row blocks, at blocksizes 16/256/2048/8192:
    compute-sanitizer reports any out-of-bounds access."""
    from memopt.kernels import quantize as k_quant

    for blocksize in (16, 256, 2048, 8192):
        for shape in [(n,) for n in sizes] + [(3, blocksize + 5), (5, 2 * blocksize - 1)]:
            x = torch.randn(shape, device=device)
            codes, absmax = k_quant.quantize_blockwise(x, blocksize=blocksize)
            k_quant.dequantize_blockwise(codes, absmax, blocksize=blocksize)
            for kernel in ("sgdsai_8bit", "adamw_8bit"):
                for dtype, sr in ((torch.float32, False), (torch.bfloat16, True)):
                    p, g = x.to(dtype), (x * 1e-3).to(dtype)
                    state = _state(kernel, shape, device, blocksize)
                    for t in (1, 2):
                        _update(kernel, _impls(kernel)[1], p, g, state, sr, t, blocksize)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("memcheck workload done: every kernel, blocksizes 16/256/2048/8192, sizes", sizes)


def profile(device, shape, out: Path) -> None:
    """torch.profiler over 20 steps of the 8-bit SGD-SaI kernel (bf16, stochastic rounding on): kernel time per
    launch next to the copy of the same tensor, in profile.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from memopt.kernels import sgdsai as k_sgdsai

    p = torch.randn(shape, device=device, dtype=torch.bfloat16)
    g = torch.randn(shape, device=device, dtype=torch.bfloat16) * 1e-3
    state = _state("sgdsai_8bit", shape, device)
    src = torch.randn(shape, device=device)
    dst = torch.empty_like(src)
    for t in (1, 2):
        _update("sgdsai_8bit", k_sgdsai, p, g, state, True, t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(20):
            _update("sgdsai_8bit", k_sgdsai, p, g, state, True, 3)
            dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    (out / "profile.txt").write_text(f"shape {shape}, bf16, stochastic rounding on, 20 steps\n{table}\n")
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["parity", "memcheck", "profile"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu"))
    ap.add_argument("--dry-run", action="store_true")
    cli = ap.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cli.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")
    device = torch.device("cpu" if cli.dry_run else "cuda")
    big = (64, 96) if cli.dry_run else (4096, 11008)
    if cli.what == "parity":
        parity(device, big, out)
    elif cli.what == "memcheck":
        memcheck(device, [1, 17, 255, 257, 1000] if cli.dry_run else [1, 17, 255, 257, 1000, 4097, 65537])
    else:
        profile(device, big, out)


if __name__ == "__main__":
    main()
