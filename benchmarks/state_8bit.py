"""8-bit optimizer state on CPU: bytes/param and step time of memopt's 8-bit optimizers vs baselines.

Question: on the demo model's real parameter set (SmolLM2-135M, 134.5M params, fp32), how many bytes of state
does each optimizer hold, and what does a step cost relative to 32-bit SGD-SaI and torch AdamW, run side by
side in one process? Embeddings keep 32-bit state in the memopt and bitsandbytes 8-bit optimizers (what the
Trainer does for both); their bytes are reported separately. torchao's AdamW8bit (optional: pip install torchao)
runs on CPU through torch.compile and has no per-parameter override, so its embedding state is 8-bit. On CPU memopt's
8-bit path is the PyTorch reference (Triton runs on CUDA only), so the CPU step times
say nothing about the fused kernels: benchmarks/kernels_gpu.py measures those.

    python benchmarks/state_8bit.py [--rounds 3] [--out benchmarks/results/state_8bit]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import write_csv  # noqa: E402


def _bnb(cls_name, **kw):
    def make(params, embedding):
        import bitsandbytes as bnb

        opt = getattr(bnb.optim, cls_name)(params, **kw)
        bnb.optim.GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
        return opt
    return make


BASELINES = {
    "sgdsai_32bit": lambda ps, emb: memopt.SGDSaI(ps, lr=1e-3, weight_decay=0.0),
    "sgdsai_8bit": lambda ps, emb: memopt.SGDSaI(ps, lr=1e-3, weight_decay=0.0, state_bits=8),
    "memopt_adamw_8bit": lambda ps, emb: memopt.AdamW8bit(ps, lr=1e-3, weight_decay=0.0),
    "torch_sgd_momentum": lambda ps, emb: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
    "torch_adamw": lambda ps, emb: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, foreach=True),
    "bnb_adamw8bit": _bnb("AdamW8bit", lr=1e-3, weight_decay=0.0),
    "bnb_sgd8bit": _bnb("SGD8bit", lr=1e-3, momentum=0.9),
    # torchao compiles its step with torch.compile (inductor, CPU); it has no per-module 32-bit override, so
    # its embedding state is 8-bit too (block 256, tensors >= 4096 elements quantized).
    "torchao_adamw8bit": lambda ps, emb: __import__("torchao.optim", fromlist=["AdamW8bit"]).AdamW8bit(
        ps, lr=1e-3, weight_decay=0.0),
}


def _leaves(opt, p):
    for t in opt.state.get(p, {}).values():
        if isinstance(t, torch.Tensor):
            yield from memopt.memory._leaves(t)


def _shared_ptrs(opt) -> set:
    """Storage shared between params' state (bitsandbytes keeps one quantization map per state key)."""
    seen, shared = set(), set()
    for p in opt.state:
        for leaf in _leaves(opt, p):
            (shared if leaf.data_ptr() in seen else seen).add(leaf.data_ptr())
    return shared


def _state_bytes_of(opt, p, shared: set) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in _leaves(opt, p) if leaf.data_ptr() not in shared)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "state_8bit"))
    cli = ap.parse_args()
    from memopt.demo import smollm2_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    emb = model.get_input_embeddings()
    memopt.keep_32bit_state(emb.weight)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    n_emb = emb.weight.numel()
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    rows = []
    names = cli.only or list(BASELINES)
    opts = {}
    for name in names:
        opts[name] = BASELINES[name](params, emb)
        opts[name].step()  # creates state, not timed
    times = {name: [] for name in names}
    for _ in range(cli.rounds):
        for name in names:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ref32 = statistics.median(times["sgdsai_32bit"]) if "sgdsai_32bit" in times else None
    ref_adamw = statistics.median(times["torch_adamw"]) if "torch_adamw" in times else None
    for name in names:
        opt = opts[name]
        total = memopt.state_bytes(opt)
        shared = _shared_ptrs(opt)
        per_param = {p: _state_bytes_of(opt, p, shared) for p in params}
        is_8bit = {p: any(leaf.dtype == torch.uint8 for leaf in _leaves(opt, p)) for p in params}
        emb_bytes = per_param[emb.weight]
        small = sum(b for p, b in per_param.items() if p is not emb.weight and not is_8bit[p])
        quantized_params = sum(p.numel() for p in params if is_8bit[p])
        quantized_bytes = sum(b for p, b in per_param.items() if is_8bit[p])
        med = statistics.median(times[name])
        rows.append({
            "optimizer": name, "params": n_params, "state_bytes": total,
            "state_bytes_per_param": round(total / n_params, 4),
            "quantized_params": quantized_params,
            "bytes_per_quantized_param": round(quantized_bytes / quantized_params, 4) if quantized_params else "",
            "embedding_state_bytes": emb_bytes, "embedding_params": n_emb, "small_tensor_state_bytes": small,
            "step_ms_median": round(med, 1),
            "ratio_vs_sgdsai_32bit": round(med / ref32, 3) if ref32 else "",
            "ratio_vs_torch_adamw": round(med / ref_adamw, 3) if ref_adamw else "",
            "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(),
        })
        print(f"{name:<20} {total / n_params:6.3f} B/param  quantized {rows[-1]['bytes_per_quantized_param']} "
              f"B/param  {med:9.1f} ms")
    print(f"wrote {write_csv(Path(cli.out), rows)}")


if __name__ == "__main__":
    main()
