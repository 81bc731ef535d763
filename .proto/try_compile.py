import time, subprocess, tempfile, os, re, inspect
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from memopt.kernels import sgdsai, adamw, quantize
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")

def compile_k(fn, sig, consts, arch=90, warps=4):
    names = fn.arg_names
    signature = {}
    for n in names:
        signature[n] = "constexpr" if n in consts else sig[n]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in consts and (sig[n].startswith("*") or n in ("row_len", "n"))}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    t = time.time()
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    dt = time.time() - t
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"]); path = f.name
    res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    sass = subprocess.run([f"{BIN}/nvdisasm", "-c", path], capture_output=True, text=True).stdout
    n_ins = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))
    reg = int(re.search(r"REG:(\d+)", res).group(1)); local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    return dict(t=dt, reg=reg, local=local, ins=n_ins, sass=sass, ptx=c.asm["ptx"])

if __name__ == "__main__":
    sig = dict(p_ptr="*fp32", g_ptr="*fp32", codes_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", mids_ptr="*fp32",
               row_len="i32", per_row="i32", alpha="fp32", decay="fp32", weight="fp32", seed="i32")
    for B in (256, 2048, 8192):
        r = compile_k(sgdsai._sgdsai_8bit_kernel, sig, dict(FIRST=False, P_KIND=0, SR=False, BLOCK=B))
        print(B, {k: r[k] for k in ("t", "reg", "local", "ins")}, "per elem", r["ins"] / (B / 128))
