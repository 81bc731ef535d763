"""GPU kernel and step benchmarks for the 8-bit work, one run on a CUDA GPU (H100/H200 or any other).

What it measures, every row written to the CSV as soon as it is measured (a failure of one case is a row with its
error, and the others still run):
1. ``kernel`` rows: each Triton kernel on flat buffers (1M-256M elements) and real shapes (4096x4096,
   4096x11008), bf16 parameters, stochastic rounding off and on for the update kernels; GB/s from the bytes each
   kernel must move (BYTES: read + write, one pass) and that as a % of the device-to-device copy measured in the
   same process.
2. ``step`` rows: a whole optimizer step over transformer-like layers (bf16) for memopt's Triton optimizers
   (stochastic rounding off and on), torch fused AdamW, torch SGD-momentum foreach and bitsandbytes AdamW8bit.
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, about a second of
repetitions per case). The quantize row times the kernel alone (its launcher's finite check waits for the GPU).

    python benchmarks/kernels_gpu.py --out benchmarks/results/gpu/kernels_gpu
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --dry-run    # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import memopt  # noqa: E402
from _common import RowWriter  # noqa: E402

# bytes moved per element (read + write), bf16 parameter and gradient where the kernel has them; absmax per 256
BYTES = {
    "copy_fp32": 8.0,  # read 4 + write 4
    "quantize_fp32": 4 + 1 + 4 / 256,
    "dequantize_fp32": 1 + 4 / 256 + 4,
    "sgdsai_8bit_bf16": 2 + 2 + 2 + 2 * (1 + 4 / 256),  # read p, g, codes+absmax; write p, codes+absmax
    "adamw_8bit_bf16": 2 + 2 + 2 + 4 * (1 + 4 / 256),
    "sgdsai_fp32": 4 * 5,  # read p, g, m; write p, m
}
FIELDS = ["what", "kernel", "stochastic_rounding", "target", "elements", "ms_median", "bytes_per_element", "GBps",
          "pct_of_copy_bw", "state_bytes_per_param", "error", "device", "torch", "triton", "machine"]
REP_MS = 1000  # do_bench runs each case for about this long


def bench(fn, device) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=100, rep=REP_MS, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def kernel_rows(device, sizes, shapes, emit):
    from memopt.kernels import adamw as k_adamw
    from memopt.kernels import quantize as k_quant
    from memopt.kernels import sgdsai as k_sgdsai

    targets = [(f"flat_{n // 2**20}M" if n >= 2**20 else f"flat_{n}", (n,)) for n in sizes]
    targets += [(f"{a}x{b}", (a, b)) for a, b in shapes]
    for label, shape in targets:
        _target_rows(device, label, shape, emit, k_adamw, k_quant, k_sgdsai)  # its tensors are freed on return
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _target_rows(device, label, shape, emit, k_adamw, k_quant, k_sgdsai):
    n = 1
    for d in shape:
        n *= d
    copy_gbps = None
    try:
        x32 = torch.randn(shape, device=device)
        copy_dst = torch.empty_like(x32)
        p = torch.randn(shape, device=device, dtype=torch.bfloat16)
        g = torch.randn(shape, device=device, dtype=torch.bfloat16) * 1e-3
        codes, absmax = k_quant.quantize_blockwise(x32)
        codes2, absmax2 = k_quant.quantize_blockwise(x32.abs(), memopt.functional.create_dynamic_map(False))
        q_codes, q_absmax = torch.empty_like(codes), torch.empty_like(absmax)
        m32 = torch.zeros(shape, device=device)
        p32, g32 = x32.clone(), torch.randn(shape, device=device) * 1e-3
    except Exception as exc:  # noqa: BLE001  (an OOM at the largest size must not lose the other rows)
        emit({"what": "kernel", "kernel": "setup", "target": label, "elements": n, "error": _error(exc)})
        return
    cases = [("copy_fp32", None, lambda: copy_dst.copy_(x32)),
             ("quantize_fp32", None, lambda: k_quant.launch_quantize(x32, q_codes, q_absmax, None, 256)),
             ("dequantize_fp32", None, lambda: k_quant.dequantize_blockwise(codes, absmax))]
    for sr in (False, True):
        cases += [
            ("sgdsai_8bit_bf16", sr, lambda sr=sr: k_sgdsai.sgdsai_update_8bit_(
                p, g, codes, absmax, lr=1e-5, scale=1.0, momentum=0.9, weight_decay=0.0, stochastic_rounding=sr)),
            ("adamw_8bit_bf16", sr, lambda sr=sr: k_adamw.adamw_update_8bit_(
                p, g, codes, absmax, codes2, absmax2, lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                step=10, stochastic_rounding=sr)),
        ]
    cases.append(("sgdsai_fp32", None, lambda: k_sgdsai.sgdsai_update_(p32, g32, m32, lr=1e-5, scale=1.0,
                                                                      momentum=0.9, weight_decay=0.0)))
    for kernel, sr, fn in cases:
        row = {"what": "kernel", "kernel": kernel, "stochastic_rounding": sr, "target": label, "elements": n,
               "bytes_per_element": round(BYTES[kernel], 4)}
        try:
            ms = bench(fn, device)
            gbps = BYTES[kernel] * n / (ms * 1e-3) / 1e9
            copy_gbps = gbps if kernel == "copy_fp32" else copy_gbps
            row.update(ms_median=round(ms, 4), GBps=round(gbps, 1),
                       pct_of_copy_bw=round(100 * gbps / copy_gbps, 1) if copy_gbps else "")
        except Exception as exc:  # noqa: BLE001
            row["error"] = _error(exc)
        emit(row)


def step_rows(device, layers, hidden, inter, emit):
    """Whole optimizer step over `layers` transformer-like layers (4 h² + 3 h·inter params each, bf16)."""
    shapes = []
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
    makers = {}
    for sr in (False, True):
        makers[("memopt_sgdsai_8bit_triton", sr)] = lambda ps, sr=sr: memopt.SGDSaI(
            ps, lr=1e-5, state_bits=8, use_triton=True, stochastic_rounding=sr)
        makers[("memopt_sgdsai_bf16_triton", sr)] = lambda ps, sr=sr: memopt.SGDSaI(
            ps, lr=1e-5, use_triton=True, stochastic_rounding=sr)
        makers[("memopt_adamw_8bit_triton", sr)] = lambda ps, sr=sr: memopt.AdamW8bit(
            ps, lr=1e-5, use_triton=True, stochastic_rounding=sr)
    makers[("torch_adamw_fused", None)] = lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=device.type == "cuda")
    makers[("torch_sgd_momentum_foreach", None)] = lambda ps: torch.optim.SGD(ps, lr=1e-5, momentum=0.9,
                                                                              foreach=True)
    makers[("bnb_adamw8bit", None)] = lambda ps: __import__("bitsandbytes").optim.AdamW8bit(ps, lr=1e-5)
    n = sum(a * b for a, b in shapes)
    for (name, sr), make in makers.items():
        row = {"what": "step", "kernel": name, "stochastic_rounding": sr,
               "target": f"{layers}x(h={hidden},i={inter})", "elements": n}
        params = opt = None
        try:
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02)
                      for s in shapes]
            for prm in params:
                prm.grad = torch.randn_like(prm) * 1e-3
            opt = make(params)
            opt.step()
            row.update(ms_median=round(bench(opt.step, device), 3),
                       state_bytes_per_param=round(memopt.state_bytes(opt) / n, 4))
        except Exception as exc:  # noqa: BLE001  (one optimizer failing must not lose the others)
            row["error"] = _error(exc)
            traceback.print_exc()
        emit(row)
        del params, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu" / "kernels_gpu"))
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (needs TRITON_INTERPRET=1)")
    cli = ap.parse_args()
    if cli.dry_run:
        device = torch.device("cpu")
        sizes, shapes, step_cfg = [4096], [(64, 96)], (1, 64, 128)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernels_gpu.py needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")
        device = torch.device("cuda")
        sizes, shapes, step_cfg = [2**20, 2**22, 2**24, 2**26, 2**28], [(4096, 4096), (4096, 11008)], (8, 4096, 11008)
    import triton

    common = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter dry run)",
              "torch": torch.__version__, "triton": triton.__version__, "machine": platform.machine()}
    writer = RowWriter(Path(cli.out + ("_dryrun" if cli.dry_run else "")), FIELDS)

    def emit(row):
        row = {**row, **common}
        writer.write(row)
        print({k: v for k, v in row.items() if k not in common and v not in ("", None)}, flush=True)

    kernel_rows(device, sizes, shapes, emit)
    step_rows(device, *step_cfg, emit)
    print(f"wrote {writer.path}")


if __name__ == "__main__":
    main()
