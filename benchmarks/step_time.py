"""Optimizer step time and state bytes of every registered memopt optimizer beside bitsandbytes and torch.

Question: on the demo model's real parameter set (SmolLM2-135M, 134.5M params in 272 tensors, fp32), how long
does one ``step()`` of each optimizer take, how much state does it hold, and how close does it come to the memory
bandwidth that torch's fused AdamW reaches? Every optimizer is built as the Trainer's ``optim=`` route builds it
(its own parameter groups: projection targets, 32-bit embeddings under 8-bit state) with its default settings and
weight decay 0 (bitsandbytes: 32-bit embedding state, as the Trainer sets it), on one shared set of parameters and
fixed random gradients; all run in one process, interleaved round-robin so drift affects all alike; medians of
``--rounds`` x ``--steps`` after one untimed step.

``bytes_per_param`` is the least traffic a step needs: read the parameter and the gradient, write the parameter,
read and write the state (3 x 4 B + 2 x state bytes per param for fp32); ``GBps`` is that over the step time, and
``bandwidth_vs_torch_adamw_fused`` its ratio to torch fused AdamW's (the fastest step here). ``path``: the update
paths of the last step (as the memory report shows them).

    python benchmarks/step_time.py [--rounds 3 --steps 3] [--only sgdsai,bnb_sgd8bit] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import write_csv  # noqa: E402

REFERENCE_SGD = "torch_sgd_momentum_foreach"
REFERENCE_ADAMW = "torch_adamw_fused"


def _torch_and_bnb() -> dict:
    """The baselines: name -> factory(model)."""

    def params(model):
        return [p for p in model.parameters() if p.requires_grad]

    def bnb(cls):
        def make(model):
            import bitsandbytes as bnb

            kwargs = dict(lr=1e-3, weight_decay=0.0)
            if cls == "SGD8bit":
                kwargs["momentum"] = 0.9
            opt = getattr(bnb.optim, cls)(params(model), **kwargs)
            manager = bnb.optim.GlobalOptimManager.get_instance()  # embeddings keep 32-bit state, as the Trainer does
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
            return opt
        return make

    return {
        REFERENCE_SGD: lambda m: torch.optim.SGD(params(m), lr=1e-3, momentum=0.9, dampening=0.9, foreach=True),
        "torch_sgd_momentum_fused": lambda m: torch.optim.SGD(params(m), lr=1e-3, momentum=0.9, dampening=0.9,
                                                              fused=True),
        REFERENCE_ADAMW: lambda m: torch.optim.AdamW(params(m), lr=1e-3, weight_decay=0.0, fused=True),
        "torch_adamw_foreach": lambda m: torch.optim.AdamW(params(m), lr=1e-3, weight_decay=0.0, foreach=True),
        "bnb_sgd8bit": bnb("SGD8bit"),
        "bnb_adamw8bit": bnb("AdamW8bit"),
    }


def _memopt(name: str):
    def make(model):
        from memopt.integrations.transformers import param_groups_for

        args = types.SimpleNamespace(weight_decay=0.0, optim_target_modules=None)  # what the groups read
        groups = [{**g, "weight_decay": 0.0} for g in param_groups_for(name, model, args)]
        return memopt.create_optimizer(name, groups)
    return make


def factories() -> dict:
    return {**_torch_and_bnb(), **{name: _memopt(name) for name in memopt.list_optimizers()}}


def demo_model():
    """The demo model (SmolLM2-135M-Instruct's shapes and weights), fp32."""
    from transformers import AutoModelForCausalLM

    from memopt.demo import smollm2_checkpoint

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names (the two references are always run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time"))
    cli = ap.parse_args()

    model = demo_model()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    wanted = {n for n in cli.only.split(",") if n} | {REFERENCE_SGD, REFERENCE_ADAMW}
    makers = {n: f for n, f in factories().items() if not cli.only or n in wanted}
    opts, errors = {}, {}
    for name, make in makers.items():
        try:
            opts[name] = make(model)
            opts[name].step()  # state, g-SNRs and projections are created by the first step: not timed
        except Exception as exc:  # one optimizer that cannot run here must not lose the others' rows
            errors[name] = f"{type(exc).__name__}: {exc}"
            opts.pop(name, None)
            print(f"{name}: {errors[name]}")
        gc.collect()
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(cli.rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(cli.steps):
                opt.step()
            times[name].append((time.perf_counter() - t0) / cli.steps * 1e3)

    state = {name: memopt.state_bytes(opt) for name, opt in opts.items()}  # counts any optimizer's state tensors
    moved = {name: 3 * 4 * n_params + 2 * sb for name, sb in state.items()}

    ref_sgd = statistics.median(times[REFERENCE_SGD])
    ref_adamw = statistics.median(times[REFERENCE_ADAMW])
    ref_bw = moved[REFERENCE_ADAMW] / ref_adamw
    rows = []
    for name, opt in opts.items():
        med = statistics.median(times[name])
        sb = state[name]
        paths = getattr(opt, "update_paths", None)
        rows.append({
            "optimizer": name, "params": n_params, "tensors": len(params), "state_bytes": sb,
            "state_bytes_per_param": round(sb / n_params, 4), "step_ms_median": round(med, 1),
            "step_ms_min": round(min(times[name]), 1),
            "ratio_vs_torch_sgd_momentum_foreach": round(med / ref_sgd, 3),
            "ratio_vs_torch_adamw_fused": round(med / ref_adamw, 3),
            "bytes_per_param": round(moved[name] / n_params, 3), "GBps": round(moved[name] / med / 1e6, 2),
            "bandwidth_vs_torch_adamw_fused": round(moved[name] / med / ref_bw, 3),
            "path": " ".join(f"{k}={v}" for k, v in paths.items()) if paths else "",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "rounds_x_steps": f"{cli.rounds}x{cli.steps}",
        })
    for name, why in errors.items():
        rows.append({"optimizer": name, "path": f"not run: {why}"})
    out = Path(cli.out)
    write_csv(out, rows)
    for r in rows:
        if "step_ms_median" not in r:
            print(f"{r['optimizer']:<28} {r['path']}")
            continue
        print(f"{r['optimizer']:<28} {r['state_bytes_per_param']:>6.3f} B/param {r['step_ms_median']:>8.1f} ms  "
              f"x{r['ratio_vs_torch_sgd_momentum_foreach']:<6.3f} vs SGD  x{r['ratio_vs_torch_adamw_fused']:<6.3f} "
              f"vs AdamW fused  {r['GBps']:>6.2f} GB/s ({r['bandwidth_vs_torch_adamw_fused']:.2f})  {r['path']}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "step_ms_median" in r]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 0.35 * len(timed) + 1.5))
    names = [r["optimizer"] for r in timed]
    a1.barh(names, [r["state_bytes_per_param"] for r in timed], color="tab:blue")
    a1.set_xlabel("optimizer state, bytes per parameter")
    a2.barh(names, [r["step_ms_median"] for r in timed], color="tab:orange")
    a2.set_xscale("log")
    a2.set_xlabel(f"step time, ms (median, CPU, {torch.get_num_threads()} threads; log scale)")
    a2.set_yticklabels([])
    a3.barh(names, [r["bandwidth_vs_torch_adamw_fused"] for r in timed], color="tab:green")
    a3.axvline(1.0, color="k", lw=0.8)
    a3.set_xlabel("bandwidth (least bytes moved / time) vs torch fused AdamW")
    a3.set_yticklabels([])
    for ax in (a1, a2, a3):
        ax.invert_yaxis()
    fig.suptitle(f"SmolLM2-135M parameter set ({n_params / 1e6:.1f}M params, {len(params)} tensors, fp32)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
