"""Does `memopt plan` predict the weights + grads + optimizer-state memory of a real run?

For each small config-built Llama and each optimizer, a fresh subprocess (CPU, fp32, one thread):
1. imports torch / transformers / memopt (and bitsandbytes), runs a warm-up step of a 2-layer toy model with the
   same optimizer so that lazily loaded kernels and one-time buffers are in place, frees it, and records RSS;
2. builds the model from its config, runs one forward/backward/optimizer step at batch 1 x 8 tokens (activations
   are negligible and freed after backward; gradients are kept), and records RSS again.
The RSS increase is compared with the planner's prediction (`memopt.plan.exact_parts` on the meta model built from
the same config): rows with ``check=exact``. RSS is read from /proc/self/status (VmRSS) after ``gc.collect()``
and glibc ``malloc_trim(0)``:
without the trim, glibc keeps freed temporaries (weight init, the optimizer step's foreach buffers) in the heap
and RSS overstates live memory; the untrimmed delta is written too. ``tensor_bytes`` counts the live tensors
(weights, buffers, grads, ``memopt.state_bytes``) in the same process: prediction == tensor_bytes is the exactness
check, tensor_bytes vs RSS shows what the allocator adds.

Rows with ``check=activations`` test the activation ESTIMATE the same way, as far as a CPU allows: after a warm-up
step (gradients allocated and kept), the peak RSS (VmHWM, reset through /proc/self/clear_refs) of one fp32
forward/backward at a real batch x sequence length, minus the RSS before it, against
``estimate_activations(..., bytes_per_activation=4)``. fp32 CPU kernels are not bf16 GPU kernels: this checks the
counting, not a GPU's peak.

    OMP_NUM_THREADS=1 python benchmarks/plan_validation.py      # ~2 minutes on one core

Writes benchmarks/results/plan_validation.csv.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    # name: LlamaConfig kwargs (vocab 32000 as Llama-2; sizes chosen to span ~10M-50M parameters)
    "llama-9M": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, tie_word_embeddings=False),
    "llama-23M-tied": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                           num_key_value_heads=6, tie_word_embeddings=True),
    "llama-52M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, tie_word_embeddings=False),
}
OPTIMIZERS = ("adamw", "sgdsai", "sgdsai_8bit", "frugal", "bnb_adamw8bit")
# each as TrainingArguments(optim=..., optim_args=...) names it (what memopt.plan takes)
SETUPS = {"adamw": ("adamw_torch", ""), "sgdsai": ("sgdsai", ""), "sgdsai_8bit": ("sgdsai_8bit", ""),
          "frugal": ("frugal", "density=0.25"), "bnb_adamw8bit": ("adamw_bnb_8bit", "")}
ACTIVATION_RUNS = (("llama-23M-tied", 4, 256, False), ("llama-23M-tied", 4, 256, True), ("llama-52M", 2, 512, False))
RESULTS = Path(__file__).resolve().parent / "results" / "plan_validation.csv"


def _config(name: str, toy: bool = False):
    from transformers import LlamaConfig

    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128) if toy else dict(MODELS[name], vocab_size=32000)
    return LlamaConfig(max_position_embeddings=64, **kwargs)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this measurement needs Linux)")


def _trimmed_rss() -> tuple[int, int]:
    """(RSS after gc, RSS after gc + malloc_trim)."""
    gc.collect()
    before = _rss()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return before, _rss()


def _make_optimizer(name: str, model):
    import torch

    import memopt
    from memopt.targets import projection_groups

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    if name in ("sgdsai", "sgdsai_8bit"):
        if name == "sgdsai_8bit":
            memopt.keep_32bit_state(model.get_input_embeddings())  # as the Trainer integration does
        return memopt.SGDSaI(model.parameters(), lr=1e-2, state_bits=8 if name == "sgdsai_8bit" else 32)
    if name == "frugal":
        return memopt.FRUGAL(projection_groups(model, None, 0.01), lr=1e-3, density=0.25)
    if name == "bnb_adamw8bit":
        import bitsandbytes as bnb

        # what Trainer(optim="adamw_bnb_8bit") builds
        opt = bnb.optim.AdamW(model.parameters(), lr=1e-4, optim_bits=8)
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def _one_step(config, optimizer: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    opt = _make_optimizer(optimizer, model)
    ids = torch.randint(0, config.vocab_size, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    del loss
    opt.step()
    return model, opt


def worker(model_name: str, optimizer: str) -> dict:
    """Runs in a fresh process: the measured RSS increase and the live tensor bytes of one step."""
    import torch

    import memopt
    from memopt import plan as planner

    if optimizer == "bnb_adamw8bit":
        import bitsandbytes  # noqa: F401
    torch.set_num_threads(1)
    toy = _one_step(_config("", toy=True), optimizer)  # warm-up: lazy kernels, one-time buffers
    del toy
    if optimizer == "bnb_adamw8bit":
        import bitsandbytes as bnb

        bnb.optim.GlobalOptimManager.get_instance().initialize()
    _, rss0 = _trimmed_rss()
    t0 = time.perf_counter()
    model, opt = _one_step(_config(model_name), optimizer)
    seconds = time.perf_counter() - t0
    untrimmed, rss1 = _trimmed_rss()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = memopt.state_bytes(opt)
    summary = planner.summarize_model(planner.build_meta_model(_config(model_name)), source=model_name)
    optim, optim_args = SETUPS[optimizer]
    pred = planner.exact_parts(summary, planner.Setup(optimizer, optim, optim_args), "fp32")
    return {
        "model": model_name, "params": summary.numel, "optimizer": optimizer,
        "pred_weights": pred.weights_bytes, "pred_grads": pred.grads_bytes, "pred_state": pred.state_bytes,
        "predicted_bytes": pred.total, "tensor_bytes": weights + grads + state,
        "measured_rss_delta": rss1 - rss0, "measured_rss_delta_untrimmed": untrimmed - rss0,
        "step_seconds": round(seconds, 2),
    }


def activation_worker(model_name: str, batch: int, seq_len: int, checkpointing: bool) -> dict:
    """Runs in a fresh process: peak RSS growth of one fp32 forward/backward vs the activation estimate."""
    import torch
    from transformers import AutoModelForCausalLM

    from memopt import plan as planner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = _config(model_name)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, config.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up; keeps (zeroed) gradients allocated
    model.zero_grad(set_to_none=False)
    _, rss0 = _trimmed_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    model(input_ids=ids, labels=ids).loss.backward()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    summary = planner.summarize_model(model, source=model_name)
    est = planner.estimate_activations(summary, batch, seq_len, checkpointing=checkpointing, bytes_per_activation=4)
    return {"model": model_name, "params": summary.numel, "optimizer": "-", "batch": batch, "seq_len": seq_len,
            "act_ckpt": "on" if checkpointing else "off", "pred_activation_layers": est.layers_bytes,
            "pred_logits": est.logits_bytes, "predicted_bytes": est.total, "measured_rss_delta": hwm - rss0}


def _run_worker(*args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-activations", action="store_true", help="skip the activation-estimate rows")
    args = parser.parse_args()
    if args.worker and len(args.worker) == 2:
        print(json.dumps(worker(*args.worker)))
        return
    if args.worker:
        name, batch, seq_len, ckpt = args.worker
        print(json.dumps(activation_worker(name, int(batch), int(seq_len), ckpt == "True")))
        return

    import torch

    from _common import write_csv

    rows = []
    for model_name in args.models:
        for optimizer in args.optimizers:
            r = dict(check="exact", **_run_worker(model_name, optimizer))
            r["rel_error"] = round((r["predicted_bytes"] - r["measured_rss_delta"]) / r["measured_rss_delta"], 4)
            r["rel_error_untrimmed"] = round(
                (r["predicted_bytes"] - r["measured_rss_delta_untrimmed"]) / r["measured_rss_delta_untrimmed"], 4)
            r.update(device="cpu", threads=1, torch=torch.__version__, machine=platform.machine())
            rows.append(r)
            print(f"{model_name:15s} {optimizer:14s} predicted {r['predicted_bytes'] / 2**20:8.1f} MiB  tensors "
                  f"{r['tensor_bytes'] / 2**20:8.1f} MiB  measured {r['measured_rss_delta'] / 2**20:8.1f} MiB  "
                  f"error {100 * r['rel_error']:+.1f}% (untrimmed {100 * r['rel_error_untrimmed']:+.1f}%)",
                  flush=True)
    for model_name, batch, seq_len, ckpt in () if args.no_activations else ACTIVATION_RUNS:
        r = dict(check="activations", **_run_worker(model_name, batch, seq_len, ckpt))
        r["rel_error"] = round((r["predicted_bytes"] - r["measured_rss_delta"]) / r["measured_rss_delta"], 4)
        r.update(device="cpu", threads=1, torch=torch.__version__, machine=platform.machine())
        rows.append(r)
        print(f"activations {model_name:15s} b{batch} s{seq_len} ckpt {r['act_ckpt']:3s} predicted "
              f"{r['predicted_bytes'] / 2**20:8.1f} MiB  measured peak {r['measured_rss_delta'] / 2**20:8.1f} MiB  "
              f"error {100 * r['rel_error']:+.1f}%", flush=True)
    print(f"wrote {write_csv(args.out, rows)}")


if __name__ == "__main__":
    main()
