"""GPU kernel and step benchmarks for the 8-bit work, one run on a CUDA GPU (H100/H200 or any other).

Questions: (1) what bandwidth do memopt's Triton kernels reach on flat buffers (1M-256M elements) and real
shapes (4096², 4096x11008), as a % of the device-to-device copy bandwidth measured in the same process;
(2) what does a whole optimizer step over a 7B-layer-like parameter set cost against bitsandbytes AdamW8bit and
torch fused AdamW. Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed). Bytes moved
per element are written formulas (read + write, one pass), listed in BYTES.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_gpu
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --dry-run    # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import memopt  # noqa: E402
from _common import write_csv  # noqa: E402

# bytes moved per element (read + write), bf16 param and grad unless stated
BYTES = {
    "copy_fp32": 8.0,  # read 4 + write 4
    "quantize_fp32": 4 + 1 + 4 / 256,
    "dequantize_fp32": 1 + 4 / 256 + 4,
    "sgdsai_8bit_bf16": 2 + 2 + 2 + 2 * (1 + 4 / 256),  # read p, g, codes+absmax; write p, codes+absmax
    "adamw_8bit_bf16": 2 + 2 + 2 + 4 * (1 + 4 / 256),
    "sgdsai_fp32": 4 * 5,  # read p, g, m; write p, m
}


def bench(fn, device) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_rows(device, sizes, shapes):
    from memopt.kernels import adamw as k_adamw
    from memopt.kernels import quantize as k_quant
    from memopt.kernels import sgdsai as k_sgdsai

    rows = []
    targets = [(f"flat_{n // 2**20}M" if n >= 2**20 else f"flat_{n}", (n,)) for n in sizes]
    targets += [(f"{a}x{b}", (a, b)) for a, b in shapes]
    for label, shape in targets:
        n = 1
        for d in shape:
            n *= d
        nb = -(-n // 256)
        x32 = torch.randn(shape, device=device)
        copy_dst = torch.empty_like(x32)
        p = torch.randn(shape, device=device, dtype=torch.bfloat16)
        g = torch.randn(shape, device=device, dtype=torch.bfloat16) * 1e-3
        codes, absmax = k_quant.quantize_blockwise(x32)
        codes2, absmax2 = k_quant.quantize_blockwise(x32.abs(), memopt.functional.create_dynamic_map(False))
        m32 = torch.zeros(shape, device=device)
        p32, g32 = x32.clone(), torch.randn(shape, device=device) * 1e-3
        cases = {
            "copy_fp32": lambda: copy_dst.copy_(x32),
            "quantize_fp32": lambda: k_quant.quantize_blockwise(x32),
            "dequantize_fp32": lambda: k_quant.dequantize_blockwise(codes, absmax),
            "sgdsai_8bit_bf16": lambda: k_sgdsai.sgdsai_update_8bit_(p, g, codes, absmax, lr=1e-5, scale=1.0,
                                                                      momentum=0.9, weight_decay=0.0),
            "adamw_8bit_bf16": lambda: k_adamw.adamw_update_8bit_(p, g, codes, absmax, codes2, absmax2, lr=1e-5,
                                                                  beta1=0.9, beta2=0.999, eps=1e-8,
                                                                  weight_decay=0.0, step=10),
            "sgdsai_fp32": lambda: k_sgdsai.sgdsai_update_(p32, g32, m32, lr=1e-5, scale=1.0, momentum=0.9,
                                                           weight_decay=0.0),
        }
        copy_ms = None
        for kernel, fn in cases.items():
            ms = bench(fn, device)
            gbps = BYTES[kernel] * n / (ms * 1e-3) / 1e9
            if kernel == "copy_fp32":
                copy_ms, copy_gbps = ms, gbps
            rows.append({"what": "kernel", "kernel": kernel, "target": label, "elements": n, "blocks": nb,
                         "ms_median": round(ms, 4), "bytes_per_element": round(BYTES[kernel], 4),
                         "GBps": round(gbps, 1), "pct_of_copy_bw": round(100 * gbps / copy_gbps, 1)})
        del copy_ms
    return rows


def step_rows(device, layers, hidden, inter):
    """Whole optimizer step over `layers` transformer-like layers (4 h² + 3 h·inter params each, bf16)."""
    torch.manual_seed(0)
    shapes = []
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
    makers = {
        "memopt_sgdsai_8bit_triton": lambda ps: memopt.SGDSaI(ps, lr=1e-5, state_bits=8, use_triton=True),
        "memopt_sgdsai_bf16_triton": lambda ps: memopt.SGDSaI(ps, lr=1e-5, use_triton=True),
        "memopt_adamw_8bit_triton": lambda ps: memopt.AdamW8bit(ps, lr=1e-5, use_triton=True),
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=device.type == "cuda"),
        "torch_sgd_momentum_foreach": lambda ps: torch.optim.SGD(ps, lr=1e-5, momentum=0.9, foreach=True),
    }
    if device.type == "cuda":
        import bitsandbytes as bnb

        makers["bnb_adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-5)
    rows = []
    n = sum(a * b for a, b in shapes)
    for name, make in makers.items():
        params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in shapes]
        for prm in params:
            prm.grad = torch.randn_like(prm) * 1e-3
        opt = make(params)
        opt.step()
        ms = bench(opt.step, device)
        rows.append({"what": "step", "kernel": name, "target": f"{layers}x(h={hidden},i={inter})", "elements": n,
                     "ms_median": round(ms, 3), "state_bytes_per_param": round(memopt.state_bytes(opt) / n, 4)})
        del params, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_gpu"))
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
    rows = kernel_rows(device, sizes, shapes) + step_rows(device, *step_cfg)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter dry run)"
    for r in rows:
        r.update(device=name, torch=torch.__version__, machine=platform.machine())
    path = write_csv(Path(cli.out + ("_dryrun" if cli.dry_run else "")), rows)
    for r in rows:
        print({k: r[k] for k in r if k not in ("torch", "machine", "device")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
