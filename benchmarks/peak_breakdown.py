"""Where the lean setting's peak comes from, outside the Trainer: RSS and its high-water mark (MiB above the RSS
after imports) after loading, each forward, backward and optimizer step of SmolLM2-135M (batch 4 x 128, activation
checkpointing, bf16 weights). A diagnostic for docs/lean.md, not a benchmark.

    python benchmarks/peak_breakdown.py bfloat16 lean     # sgdsai 8-bit + gradient release + frozen embedding
    python benchmarks/peak_breakdown.py bfloat16 adamw    # torch AdamW on the same model
"""
import sys, ctypes
from pathlib import Path
sys.path.insert(0, "/work/main/examples")
import torch, memopt
from demo_task import smollm2_checkpoint, text_splits
from transformers import AutoModelForCausalLM, AutoTokenizer
def st(k): return int([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(k)][0].split()[1]) // 1024
base = st("VmRSS")
tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
train, _ = text_splits(tok, seq_len=128)
dtype = getattr(torch, sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=dtype)
lean = sys.argv[2] == "lean"
if lean: memopt.freeze_embeddings(m)
m.gradient_checkpointing_enable(); m.train()
opt = memopt.SGDSaI([p for p in m.parameters() if p.requires_grad], lr=3e-2, state_bits=8, grad_release=True) if lean else torch.optim.AdamW(m.parameters(), lr=1e-4)
ctypes.CDLL("libc.so.6").malloc_trim(0); Path("/proc/self/clear_refs").write_text("5")
print("after load: rss", st("VmRSS") - base)
for step in range(2):
    batch = {k: torch.stack([train[i][k] for i in range(4*step, 4*step+4)]) for k in ("input_ids", "labels")}
    out = m(**batch); print(step, "after fwd: rss", st("VmRSS") - base, "hwm", st("VmHWM") - base)
    out.loss.backward(); del out; print(step, "after bwd: rss", st("VmRSS") - base, "hwm", st("VmHWM") - base)
    opt.step(); opt.zero_grad(); print(step, "after step: rss", st("VmRSS") - base, "hwm", st("VmHWM") - base)
