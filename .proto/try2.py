import sys, time
sys.path.insert(0, ".proto")
from try_compile import compile_k
from memopt.kernels import sgdsai, adamw, quantize
from memopt.kernels._common import launch_config
from memopt.kernels.quantize import code_map
import torch
s = code_map(None, True, torch.device("cpu")); u = code_map(None, False, torch.device("cpu"))
sig = dict(p_ptr="*fp32", g_ptr="*fp32", codes_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", table_ptr="*i64", mids_ptr="*fp32",
           row_len="i32", per_row="i32", n_blocks="i32", zero="i32", alpha="fp32", decay="fp32", weight="fp32", seed="i32")
for P, pt, SR in ((0, "*fp32", False), (0, "*bf16", False), (0, "*bf16", True)):
  for B in (16, 256, 2048, 8192):
    cfg = launch_config(B)
    sig.update(p_ptr=pt, g_ptr=pt)
    r = compile_k(sgdsai._sgdsai_8bit_kernel, sig, dict(FIRST=False, P_KIND=P, SR=SR, M_BITS=s.m_bits, EXTRA=s.extra, NB=cfg["NB"], BLOCK=B, ROWS=False), warps=cfg["num_warps"])
    per = r["ins"] / (max(B, 2048) / (32 * cfg["num_warps"]))
    print("sgd8", P, SR, B, cfg, {k: round(r[k], 2) for k in ("t", "reg", "local", "ins")}, "per elem", per, "STL" in r["sass"])
asig = dict(p_ptr="*bf16", g_ptr="*bf16", mc_ptr="*u8", ma_ptr="*fp32", vc_ptr="*u8", va_ptr="*fp32", scode_ptr="*fp32", stable_ptr="*i64", smids_ptr="*fp32", ucode_ptr="*fp32", utable_ptr="*i64", umids_ptr="*fp32", row_len="i32", per_row="i32", n_blocks="i32", s_zero="i32", u_zero="i32", decay="fp32", beta1w="fp32", beta2="fp32", one_minus_beta2="fp32", inv_bc2_sqrt="fp32", eps="fp32", step_size="fp32", seed="i32")
for B in (256, 8192):
    cfg = launch_config(B)
    r = compile_k(adamw._adamw_8bit_kernel, asig, dict(SIGN=1.0, P_KIND=0, SR=False, S_BITS=s.m_bits, S_EXTRA=s.extra, U_BITS=u.m_bits, U_EXTRA=u.extra, NB=cfg["NB"], BLOCK=B, ROWS=False), warps=cfg["num_warps"])
    print("adam8", B, {k: round(r[k], 2) for k in ("t", "reg", "local", "ins")}, "per elem", r["ins"] / (max(B, 2048) / (32 * cfg["num_warps"])))
open("/tmp/sass.txt", "w").write(r["sass"])
