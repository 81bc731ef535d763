import sys, re, collections
sys.path.insert(0, "/work/main/.proto")
from try_compile import compile_k
from memopt.kernels import adamw
from memopt.kernels._common import launch_config
from memopt.kernels.quantize import code_map
import torch
s = code_map(None, True, torch.device("cpu")); u = code_map(None, False, torch.device("cpu"))
B = 256
asig = dict(p_ptr="*bf16", g_ptr="*bf16", mc_ptr="*u8", ma_ptr="*fp32", vc_ptr="*u8", va_ptr="*fp32", scode_ptr="*fp32", stable_ptr="*i64", smids_ptr="*fp32", ucode_ptr="*fp32", utable_ptr="*i64", umids_ptr="*fp32", row_len="i32", per_row="i32", n_blocks="i32", s_zero="i32", u_zero="i32", decay="fp32", beta1w="fp32", beta2="fp32", one_minus_beta2="fp32", inv_bc2_sqrt="fp32", eps="fp32", step_size="fp32", seed="i32")
cfg = launch_config(B)
r = compile_k(adamw._adamw_8bit_kernel, asig, dict(SIGN=1.0, P_KIND=0, SR=False, S_BITS=s.m_bits, S_EXTRA=s.extra, U_BITS=u.m_bits, U_EXTRA=u.extra, NB=cfg["NB"], BLOCK=B, ROWS=False, COMPILED=True), warps=cfg["num_warps"])
main = r["sass"].split(".weak")[0]
lines = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*)$", main, re.M)
print("per", len(lines) / 16, "main", len(lines), "all", r["ins"], "reg", r["reg"])
ops = [re.sub(r"^@!?U?P\w+\s+", "", l).split()[0] for l in lines]
print(collections.Counter(ops).most_common(60))
open("/tmp/sass_adam.txt", "w").write(r["sass"])
