"""Every reachable variant of the Triton kernels compiled for a GPU on any machine, and what the GPU would run.

Triton ships NVIDIA's ``ptxas``, ``cuobjdump`` and ``nvdisasm``, so a kernel compiles to a cubin for an sm_80
(A100) or sm_90 (H100/H200) target without a GPU, and its machine code (SASS) can be read: registers per thread,
local-memory spills, and the instructions a thread issues. The method and the budgets are in docs/8bit.md
("What the GPU runs"); ``tests/test_kernels_compile.py`` holds every variant to them and
``python -m memopt.kernels.sass --csv FILE`` writes the table.

The variants are the constexpr values the launchers can pass on a GPU, for the default code maps: parameter
dtype fp32/bf16/fp16 (bf16 also with stochastic rounding), every blocksize the launchers accept (16..8192), and each
kernel's own switches. Integer arguments are compiled as Triton specialises them for sizes divisible by 16 and
pointers as 16-byte aligned (what a torch allocation and a hidden size multiple of 16 give).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

ARCHS = (80, 90)
BLOCKSIZES = tuple(2**k for k in range(4, 14))  # what check_blocksize accepts
# The budget: a kernel moving B bytes per element may issue at most B * INSTRUCTIONS_PER_BYTE instructions per
# element per thread. H100/H200: 132 SMs x 4 schedulers x 1 warp instruction per clock x 32 threads x 1.98 GHz
# = 33.4e12 thread instructions/s; H200 moves 4.8e12 B/s, so reaching 85% of it leaves
# 33.4e12 / (0.85 * 4.8e12) = 8.19 instructions per byte (H100, 3.35 TB/s: 11.7; A100: 19.5e12 / (0.85 * 2.04e12)
# = 11.2). The H200 is the strictest.
INSTRUCTIONS_PER_BYTE = 33.4e12 / (0.85 * 4.8e12)
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_PARAMS = ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False))


@dataclass
class Variant:
    kernel: str  # the kernel function's name in ``module``
    label: str  # its constexpr and dtype choices, for reports
    module: str
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    num_warps: int
    elems_per_thread: int
    bytes_per_element: float

    @property
    def budget(self) -> float:
        return self.bytes_per_element * INSTRUCTIONS_PER_BYTE


def _signature(fn, types: dict, constexprs: dict) -> dict:
    return {name: "constexpr" if name in constexprs else types.get(name, "fp32") for name in fn.arg_names}


def _ints(names) -> dict:
    return dict.fromkeys(names, "i32")


@lru_cache(maxsize=1)
def variants() -> tuple[Variant, ...]:
    """Every variant the launchers can compile on a GPU (default code maps), with its bytes moved per element."""
    from memopt.kernels import _common, adamw, quantize, sgdsai

    out = []
    signed = quantize.code_map(None, True, torch.device("cpu"))
    unsigned = quantize.code_map(None, False, torch.device("cpu"))
    tables = {"ok_ptr": "*i1", "table_ptr": "*i64", "stable_ptr": "*i64", "utable_ptr": "*i64", "code_ptr": "*fp32",
              "mids_ptr": "*fp32", "scode_ptr": "*fp32", "smids_ptr": "*fp32", "ucode_ptr": "*fp32",
              "umids_ptr": "*fp32"}

    def add(fn, label, types, constexprs, num_warps, elems, nbytes):
        out.append(Variant(fn.fn.__name__, label, fn.fn.__module__, _signature(fn, types, constexprs), constexprs,
                           num_warps, elems, nbytes))

    for blocksize in BLOCKSIZES:
        cfg = _common.launch_config(blocksize)
        elems = max(_common.TILE, blocksize) // (32 * cfg["num_warps"])
        absmax = 2 * 4 / blocksize  # one fp32 maximum per block, read and written
        block = dict(NB=cfg["NB"], BLOCK=blocksize)
        for dtype, sr in _PARAMS:
            size = dtype.itemsize
            ptrs = {"p_ptr": _PTR[dtype], "g_ptr": _PTR[dtype], "codes_ptr": "*u8", "absmax_ptr": "*fp32",
                    "mc_ptr": "*u8", "ma_ptr": "*fp32", "vc_ptr": "*u8", "va_ptr": "*fp32", **tables,
                    **_ints(("row_len", "per_row", "n_blocks", "zero", "s_zero", "u_zero", "seed"))}
            name = f"{str(dtype)[6:]}{'+sr' if sr else ''}"
            for rows in (False, True):
                for first in (False, True):  # read p, g (+ codes); write p, codes
                    add(sgdsai._sgdsai_8bit_kernel, f"{name} bs={blocksize} rows={rows} first={first}", ptrs,
                        dict(FIRST=first, P_KIND=0, SR=sr, M_BITS=signed.m_bits, EXTRA=signed.extra, ROWS=rows,
                             **block), cfg["num_warps"], elems, 3 * size + (1 if first else 2) + absmax)
                for sign in (1.0, -1.0):
                    add(adamw._adamw_8bit_kernel, f"{name} bs={blocksize} rows={rows} maximize={sign < 0}", ptrs,
                        dict(SIGN=sign, P_KIND=0, SR=sr, S_BITS=signed.m_bits, S_EXTRA=signed.extra,
                             U_BITS=unsigned.m_bits, U_EXTRA=unsigned.extra, ROWS=rows, COMPILED=True, **block),
                        cfg["num_warps"], elems, 3 * size + 4 + 2 * absmax)
            if sr:
                continue
            io = {"x_ptr": _PTR[dtype], "out_ptr": _PTR[dtype], "codes_ptr": "*u8", "absmax_ptr": "*fp32", **tables,
                  **_ints(("n", "n_blocks"))}
            for cmap, which in ((signed, "signed"), (unsigned, "unsigned")):
                add(quantize._quantize_blockwise_kernel, f"{name} bs={blocksize} {which}", io,
                    dict(M_BITS=cmap.m_bits, EXTRA=cmap.extra, **block), cfg["num_warps"], elems,
                    size + 1 + absmax / 2)
            add(quantize._dequantize_blockwise_kernel, f"{name} bs={blocksize}", io, dict(OUT_KIND=0, **block),
                cfg["num_warps"], elems, 1 + size + absmax / 2)
    cfg = _common.launch_config(_common.TILE)
    elems = _common.TILE // (32 * cfg["num_warps"])
    for dtype, sr in _PARAMS:
        for m_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            for first in ((False,) if m_dtype is None else (False, True)):
                types = {"p_ptr": _PTR[dtype], "g_ptr": _PTR[dtype], "m_ptr": _PTR[m_dtype or dtype], "ok_ptr": "*i1",
                         **_ints(("n", "seed"))}
                moved = 3 * dtype.itemsize + (0 if m_dtype is None or first else 2 * m_dtype.itemsize)
                add(sgdsai._sgdsai_kernel, f"{str(dtype)[6:]}{'+sr' if sr else ''} m={str(m_dtype)[6:]} "
                    f"first={first}", types, dict(HAS_M=m_dtype is not None, FIRST=first, P_KIND=0, M_KIND=0, SR=sr,
                                                  NB=1, BLOCK=_common.TILE), cfg["num_warps"], elems, moved)
    return tuple(out)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# SASS opcodes (low 12 bits of each 16-byte sm_80/sm_90 instruction), as nvdisasm names them
NOP, BRA = 0x918, 0x947


def hot_path(cubin: bytes, kernel: str) -> list[int]:
    """Opcodes of ``kernel``'s own instructions in a cubin, read from the ELF: from the start of its ``.text``
    section to the first subroutine it calls out of line (e.g. the rarely taken branch of a correctly rounded
    division), without the BRA-to-self and NOP padding at its end."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def name(offset: int, table) -> str:
        start = table[4] + offset
        return cubin[start:cubin.index(b"\0", start)].decode()

    names = [name(sec[0], sections[shstrndx]) for sec in sections]
    index = names.index(f".text.{kernel}")
    text, symtab = sections[index], sections[names.index(".symtab")]
    end = text[5]
    for k in range(symtab[5] // 24):  # FUNC symbols in the kernel's section, other than the kernel itself
        st_name, st_info, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", cubin, symtab[4] + 24 * k)
        if st_info & 0xF == 2 and st_shndx == index and name(st_name, sections[symtab[6]]) != kernel:
            end = min(end, st_value)
    ops = [struct.unpack_from("<Q", cubin, text[4] + 16 * k)[0] & 0xFFF for k in range(end // 16)]
    while ops and ops[-1] in (NOP, BRA):
        ops.pop()
    return ops


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for ``sm_<arch>``: registers, spilled bytes, hot-path instructions (total and per element)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_variant needs a process without TRITON_INTERPRET=1 (use compile_all)")
    fn = getattr(importlib.import_module(v.module), v.kernel)
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in v.signature.items()
             if t.startswith("*") or n in ("n", "row_len")}
    src = ASTSource(fn, v.signature, constexprs={(names.index(k),): c for k, c in v.constexprs.items()},
                    attrs=attrs)
    from memopt.kernels._common import MAX_REGISTERS

    options = {"num_warps": v.num_warps, "maxnreg": MAX_REGISTERS}  # what the launchers pass (launch_config)
    cubin = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    ops = hot_path(cubin, v.kernel)
    spilled = sum(int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("LOCAL", "STACK"))
    return {"kernel": v.kernel, "variant": v.label, "arch": f"sm_{arch}", "num_warps": v.num_warps,
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)), "spilled_bytes": spilled,
            "instructions": len(ops), "per_element": round(len(ops) / v.elems_per_thread, 2),
            "bytes_per_element": round(v.bytes_per_element, 3), "budget": round(v.budget, 1)}


def _compile_one(job: tuple) -> dict:
    return compile_variant(*job)


def compile_all(archs=ARCHS, workers: int = 0, only=None) -> list[dict]:
    """:func:`compile_variant` of every variant (or of the variants ``only``) for every arch, in ``workers`` fresh
    processes (0: one per CPU) that run without ``TRITON_INTERPRET`` whatever this process uses."""
    import multiprocessing

    jobs = [(v, arch) for arch in archs for v in (variants() if only is None else only)]
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment as they start
    try:
        with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count() or 1) as pool:
            return pool.map(_compile_one, jobs, chunksize=8)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results/kernels_sass.csv")
    ap.add_argument("--arch", type=int, nargs="*", default=list(ARCHS))
    cli = ap.parse_args()
    rows = compile_all(cli.arch)
    Path(cli.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(cli.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    worst = {}
    for r in rows:
        key = (r["kernel"], r["arch"])
        if key not in worst or r["per_element"] / r["budget"] > worst[key]["per_element"] / worst[key]["budget"]:
            worst[key] = r
    for (kernel, arch), r in sorted(worst.items()):
        print(f"{kernel:28s} {arch}  worst: {r['variant']:40s} {r['per_element']:6.1f} / {r['budget']:5.1f} "
              f"instr/elem, {r['registers']} regs, spilled {r['spilled_bytes']} B")
    print(f"wrote {len(rows)} rows to {cli.csv}")


if __name__ == "__main__":
    main()
