import sys, re, collections
sys.path.insert(0, "/work/main/.proto")
from try_compile import compile_k
from memopt.kernels import sgdsai
from memopt.kernels._common import launch_config
from memopt.kernels.quantize import code_map
import torch
s = code_map(None, True, torch.device("cpu"))
B = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
sig = dict(p_ptr="*bf16", g_ptr="*bf16", codes_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", table_ptr="*i64", mids_ptr="*fp32",
           row_len="i32", per_row="i32", n_blocks="i32", zero="i32", alpha="fp32", decay="fp32", weight="fp32", seed="i32")
cfg = launch_config(B)
r = compile_k(sgdsai._sgdsai_8bit_kernel, sig, dict(FIRST=False, P_KIND=0, SR=False, M_BITS=s.m_bits, EXTRA=s.extra, NB=cfg["NB"], BLOCK=B, ROWS=False), warps=cfg["num_warps"])
sass = r["sass"]
main = sass.split(".weak")[0]
lines = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*)$", main, re.M)
print("per", len(lines) / 16, "main", len(lines), "all", r["ins"])
ops = [re.sub(r"^@!?U?P\w+\s+", "", l).split()[0].split('.')[0] for l in lines]
print(collections.Counter(ops).most_common(50))
open("/tmp/sass_main.txt", "w").write(main)
