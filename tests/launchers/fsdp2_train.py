"""Run by tests/test_fsdp2.py under `torchrun --nproc_per_node 2` (FSDP2 `fully_shard`, gloo on CPU).

    fsdp2_train.py equal OUT    each optimizer on a sharded tiny Llama, 4 steps; full params (or the refusal) -> OUT
    fsdp2_train.py save OUT [NAME]    NAME (default sgdsai): 3 steps, DCP checkpoint OUT/ckpt, 3 more steps -> OUT
    fsdp2_train.py resume OUT [NAME]  load OUT/ckpt into a fresh sharded model at this world size, 3 steps
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,  # noqa: E402
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard  # noqa: E402

import memopt  # noqa: E402
from tiny import PatternDataset, leave_distributed_run, tiny_llama  # noqa: E402

OPTIMIZERS = {
    "sgdsai": lambda ps: memopt.SGDSaI(ps, lr=1e-2, weight_decay=1e-2),
    "sgdsai_m0": lambda ps: memopt.SGDSaI(ps, lr=1e-2, momentum=0.0),
    "sgdsai_gsnr_max": lambda ps: memopt.SGDSaI(ps, lr=3e-2, weight_decay=1e-2, scale="gsnr_max"),
    "sgdsai_factored": lambda ps: memopt.SGDSaI(ps, lr=1e-2, weight_decay=1e-2, scale="factored"),
    # blocksize 16: the tiny model's rows (32, 64 elements) hold whole blocks, so its matrices are 8-bit on shards
    "sgdsai_8bit": lambda ps: memopt.SGDSaI(ps, lr=1e-2, state_bits=8, min_8bit_size=256, blocksize=16),
    "sgdsai_8bit_gsnr_max": lambda ps: memopt.SGDSaI(ps, lr=3e-2, state_bits=8, min_8bit_size=256, blocksize=16,
                                                     scale="gsnr_max"),
    "memopt_adamw_8bit": lambda ps: memopt.AdamW8bit(ps, lr=1e-3, min_8bit_size=256, blocksize=16),
    # the fused Triton kernels on the local shards (on CPU under TRITON_INTERPRET=1, which the tests set)
    "sgdsai_8bit_triton": lambda ps: memopt.SGDSaI(ps, lr=1e-2, state_bits=8, min_8bit_size=256, blocksize=16,
                                                   use_triton=True),
    "sgdsai_gsnr_max_triton": lambda ps: memopt.SGDSaI(ps, lr=3e-2, weight_decay=1e-2, scale="gsnr_max",
                                                       use_triton=True),
    "memopt_adamw_8bit_triton": lambda ps: memopt.AdamW8bit(ps, lr=1e-3, min_8bit_size=256, blocksize=16,
                                                            use_triton=True),
    "frugal": lambda ps: memopt.FRUGAL(ps, lr=1e-3, selection="random"),  # refused on shards
    "frugal_columns": lambda ps: memopt.FRUGAL(ps, lr=1e-3, selection="columns", update_gap=2),
    "frugal_blocks": lambda ps: memopt.FRUGAL(ps, lr=1e-3, selection="blocks", update_gap=2),
    "frugal_sgdsai_columns": lambda ps: memopt.FRUGAL(ps, lr=1e-2, selection="columns", inner="sgdsai",
                                                      inactive_lr_scale=0.03),
    # the registered frugal_sgdsai: SGD-SaI on whole tensors, their g-SNR reduced over the shard group
    "frugal_sgdsai_blocks": lambda ps: memopt.FRUGAL(ps, lr=1e-2, selection="blocks", inner="sgdsai",
                                                     inactive_lr_scale=0.03, update_gap=2),
    # the 8-bit inner moments: blocksize 16, so the (rows, 8) subspace and the whole rows hold whole blocks
    "frugal_8bit_columns": lambda ps: memopt.FRUGAL(ps, lr=1e-3, selection="columns", density=0.5, state_bits=8,
                                                    min_8bit_size=64, blocksize=16),
    "memopt_galore": lambda ps: memopt.GaLoreAdamW(ps, lr=1e-3, rank=4),
    "adamsnsm": lambda ps: memopt.SubsetNormSM(ps, lr=1e-3, rank=4),
    "lion": lambda ps: memopt.Lion(ps, lr=1e-4),
}


def batches(n_steps, rank=None, world=1):
    data = PatternDataset(n=8 * n_steps)
    for i in range(n_steps):
        rows = range(8 * i, 8 * i + 8)
        if rank is not None:  # this rank's share of the global batch of 8
            rows = rows[rank * 8 // world:(rank + 1) * 8 // world]
        ids = torch.stack([data[j]["input_ids"] for j in rows])
        yield {"input_ids": ids, "labels": ids}


def sharded_model(seed=0):
    model = tiny_llama(seed=seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, opt, bs):
    for batch in bs:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


# Which optimizers the non-finite run covers, and where its NaN goes: step 2 (of 4), the gradient of parameter 3 (a
# decoder matrix), its last row, which the second of two ranks holds
NAN_CASES = ["sgdsai", "sgdsai_8bit", "memopt_adamw_8bit", "sgdsai_8bit_triton"]
NAN_AT = (2, 3)


def fixed_grad_steps(model, opt, steps=4, nan_at=None):
    """Steps on the same synthetic gradients on every device count (each rank gets its rows of them): isolates the
    optimizer from the rounding of the gradient reduction. ``nan_at=(step, parameter index)``: that gradient's last
    row starts with a NaN."""
    from torch.distributed.tensor import distribute_tensor

    for t in range(steps):
        for i, (name, p) in enumerate(model.named_parameters()):
            full = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * t + i)) * 1e-2
            if nan_at == (t, i):
                full[-1, 0] = float("nan")
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full
        opt.step()
        opt.zero_grad()


def full_params(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def main():
    mode, out = sys.argv[1], sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "sgdsai"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if mode == "equal":
        results = {}
        for name, make in OPTIMIZERS.items():
            model = sharded_model()
            try:
                opt = make(list(model.parameters()))
                train(model, opt, batches(4, rank, world))
            except NotImplementedError as e:
                results[name] = {"refused": str(e)}
                continue
            params = full_params(model)  # every rank calls full_tensor (a collective)
            results[name] = {"ok": True, "paths": dict(getattr(opt, "update_paths", {})), "uint8_state": sum(
                v.dtype == torch.uint8 for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
                "params_8bit": sum(any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in st.values())
                                   for st in opt.state.values()),
                "params": sum(len(g["params"]) for g in opt.param_groups)}
            torch.save(params, os.path.join(out, f"{name}_rank{rank}.pt"))
            model = sharded_model()
            opt = make(list(model.parameters()))
            fixed_grad_steps(model, opt)
            torch.save(full_params(model), os.path.join(out, f"{name}_fixed_rank{rank}.pt"))
            if name in NAN_CASES:  # a NaN in one rank's shard: every rank skips that tensor's update, and counts it
                model = sharded_model()
                opt = make(list(model.parameters()))
                fixed_grad_steps(model, opt, nan_at=NAN_AT)
                skips = [None] * world
                dist.all_gather_object(skips, opt.nonfinite_skips)
                results[name]["nan_skips"] = skips
                torch.save(full_params(model), os.path.join(out, f"{name}_nan_rank{rank}.pt"))
        try:  # gradient release: its hook would run before the reduce-scatter
            memopt.SGDSaI(list(sharded_model().parameters()), grad_release=True)
            results["grad_release"] = {"ok": True}
        except RuntimeError as e:
            results["grad_release"] = {"refused": str(e)}
        if rank == 0:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f)
    elif mode == "save":
        model = sharded_model()
        opt = OPTIMIZERS[name](list(model.parameters()))
        bs = list(batches(6, rank, world))
        train(model, opt, bs[:3])
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(out, "ckpt"))
        torch.manual_seed(123)  # the RNG a resume restores (FRUGAL draws its next columns from it)
        train(model, opt, bs[3:])
        params = full_params(model)
        if rank == 0:
            torch.save(params, os.path.join(out, "uninterrupted.pt"))
    elif mode == "resume":
        model = sharded_model(seed=7)  # other weights: the load must overwrite them
        opt = OPTIMIZERS[name](list(model.parameters()))
        if hasattr(opt, "init_state_like_checkpoint"):  # the projection methods: the template from the checkpoint
            opt.init_state_like_checkpoint(model, os.path.join(out, "ckpt"))
        msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "ckpt"))
        set_model_state_dict(model, msd)
        set_optimizer_state_dict(model, opt, osd)
        torch.manual_seed(123)
        train(model, opt, list(batches(6, rank, world))[3:])
        params = full_params(model)
        if rank == 0:
            torch.save(params, os.path.join(out, f"resumed_world{world}.pt"))
    leave_distributed_run()


if __name__ == "__main__":
    main()
