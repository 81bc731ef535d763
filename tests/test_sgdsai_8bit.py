"""SGD-SaI with blockwise 8-bit momentum (reference path)."""

import io

import pytest
import torch

import memopt
from memopt import SGDSaI, keep_32bit_state, state_bytes_by_kind
from memopt.functional import dequantize_blockwise


def _params(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(dtype)) for s in shapes]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2 for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_state_format_and_bytes():
    big, small, odd = _params((64, 128), (32, 8), (4097,))
    opt = SGDSaI([big, small, odd], state_bits=8)
    _run(opt, [big, small, odd], _grads([big, small, odd], 1))
    st = opt.state[big]
    assert st["momentum_codes"].dtype == torch.uint8 and st["momentum_codes"].shape == big.shape
    assert st["momentum_absmax"].dtype == torch.float32 and st["momentum_absmax"].numel() == 8192 // 256
    assert opt.state[odd]["momentum_absmax"].numel() == 17
    assert "momentum_buffer" in opt.state[small]  # < 4096 elements: 32-bit
    kinds = state_bytes_by_kind(opt)
    quantized = big.numel() + odd.numel()
    assert kinds["momentum_codes"] + kinds["momentum_absmax"] <= 1.0157 * quantized + 4
    assert kinds["momentum_buffer"] == 4 * small.numel()


def test_keep_32bit_override_and_registry_name():
    emb, lin = _params((100, 64), (64, 64))
    keep_32bit_state(emb)
    opt = memopt.create_optimizer("sgdsai_8bit", [emb, lin])
    _run(opt, [emb, lin], _grads([emb, lin], 1))
    assert "momentum_buffer" in opt.state[emb] and "momentum_codes" in opt.state[lin]
    with pytest.raises(ValueError, match="bits"):
        keep_32bit_state(emb, bits=4)


def test_tracks_the_fp32_optimizer_within_an_error_budget():
    shapes = [(128, 64), (5000,)]
    p32, p8 = _params(*shapes), _params(*shapes)
    grads = _grads(p32, 20)
    # the PyTorch updates for both (their difference is the state format alone; the fused CPU update's own bounds
    # are in test_cpu_kernels.py)
    o32, o8 = SGDSaI(p32, lr=0.05, use_triton=False), SGDSaI(p8, lr=0.05, state_bits=8, use_triton=False)
    _run(o32, p32, grads[:1])
    _run(o8, p8, grads[:1])
    for a, b in zip(p32, p8):  # first step: m = g exactly in both
        assert torch.equal(a, b)
    _run(o32, p32, grads[1:])
    _run(o8, p8, grads[1:])
    for i, (a, b) in enumerate(zip(p32, p8)):
        moved = (a - _params(*shapes)[i]).abs().mean()
        err = (a - b).abs()
        # budget: 8-bit momentum error ~1-2% per step on pure-noise gradients (the hardest case)
        assert err.mean() < 0.03 * moved and err.max() < 0.3 * moved
        m32 = o32.state[a]["momentum_buffer"]
        st = o8.state[b]
        m8 = dequantize_blockwise(st["momentum_codes"], st["momentum_absmax"])
        # the map spaces codes 0.014*absmax apart near absmax: a few % relative error, accumulated over 19 steps
        assert ((m8 - m32).abs().mean() / m32.abs().mean()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_resume_bit_identical_without_dtype_cast(dtype):
    shapes = [(64, 80), (300,)]
    grads = _grads(_params(*shapes, dtype=dtype), 6)
    torch.manual_seed(0)  # bf16 writes round stochastically (default): same RNG stream for both runs
    a = _params(*shapes, dtype=dtype)
    oa = SGDSaI(a, state_bits=8)
    _run(oa, a, grads)
    torch.manual_seed(0)
    b = _params(*shapes, dtype=dtype)
    ob = SGDSaI(b, state_bits=8)
    _run(ob, b, grads[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    c = [torch.nn.Parameter(t.detach().clone()) for t in b]
    oc = SGDSaI(c, state_bits=8)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    assert oc.state[c[0]]["momentum_absmax"].dtype == torch.float32  # not cast to the param dtype
    assert oc.state[c[0]]["momentum_codes"].dtype == torch.uint8
    _run(oc, c, grads[3:])
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_nonfinite_gradient_never_touches_8bit_state():
    (p,) = _params((64, 64))
    opt = SGDSaI([p], state_bits=8)
    _run(opt, [p], _grads([p], 2))
    codes, absmax, before = (opt.state[p]["momentum_codes"].clone(), opt.state[p]["momentum_absmax"].clone(),
                             p.detach().clone())
    bad = torch.randn(64, 64)
    bad[3, 3] = float("nan")
    p.grad = bad
    opt.step()
    assert torch.equal(opt.state[p]["momentum_codes"], codes)
    assert torch.equal(opt.state[p]["momentum_absmax"], absmax)
    assert torch.equal(p.detach(), before)
    with pytest.raises(ValueError, match="check_finite"):
        SGDSaI([p], state_bits=8, check_finite=False)


@pytest.mark.parametrize("kwargs,name", [(dict(state_bits=4), "state_bits"), (dict(blocksize=0), "blocksize"),
                                         (dict(min_8bit_size=-1), "min_8bit_size")])
def test_bad_8bit_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SGDSaI(_params((4,)), **kwargs)


def test_trainer_sgdsai_8bit_keeps_embeddings_32bit(tmp_path):
    from tiny import PatternDataset, tiny_llama
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgdsai_8bit", optim_args="min_8bit_size=1024",
                             learning_rate=0.05, max_steps=15, per_device_train_batch_size=8, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert "momentum_buffer" in opt.state[model.get_input_embeddings().weight]
    assert "momentum_codes" in opt.state[model.model.layers[0].mlp.up_proj.weight]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]


def test_review_fixes_blocksize_overrides_fp32_exceptions_and_dtensor_refusal():
    with pytest.raises(ValueError, match="power of two"):
        SGDSaI(_params((4,)), state_bits=8, blocksize=100)
    big, small = _params((64, 128), (10,), dtype=torch.bfloat16)
    keep_32bit_state(small, bits=8)  # an explicit mark wins over min_8bit_size
    emb = _params((70, 70), dtype=torch.bfloat16)[0]
    keep_32bit_state(emb)
    opt = SGDSaI([big, small, emb], state_bits=8)
    _run(opt, [big, small, emb], _grads([big, small, emb], 2))
    assert "momentum_codes" in opt.state[small]
    assert opt.state[emb]["momentum_buffer"].dtype == torch.float32  # 32-bit exceptions are fp32, not bf16
    adam = memopt.AdamW8bit([emb])
    emb.grad = torch.randn_like(emb)
    adam.step()
    assert adam.state[emb]["exp_avg_sq"].dtype == torch.float32


def test_nonfinite_first_gradient_without_check_never_stores_a_nan_scale():
    p, q = _params((8, 8), (8, 8))
    opt = SGDSaI([p, q], check_finite=False)
    bad = torch.randn(8, 8)
    bad[0, 0] = float("nan")
    p.grad, q.grad = bad, torch.randn(8, 8)
    opt.step()
    assert "gsnr" not in opt.state[p]
    q0 = q.detach().clone()
    p.grad, q.grad = torch.randn(8, 8), torch.randn(8, 8)
    opt.step()
    assert torch.isfinite(q).all() and not torch.equal(q.detach(), q0)


def test_dtensor_params_on_a_one_rank_mesh_step_like_plain_tensors():
    """8-bit state on DTensor parameters (FSDP2's form) takes the shard path; on a one-rank mesh the local shard
    is the whole tensor, so the result equals the plain-tensor step (the 2-rank case: tests/test_fsdp2.py)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from tiny import free_port

    created = not dist.is_initialized()
    if created:  # a one-process group of this test's own (torn down below), on a port free now
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        w0 = torch.randn(8, 64, generator=gen)
        grads = [torch.randn(8, 64, generator=gen) * 1e-2 for _ in range(3)]
        small = dict(min_8bit_size=64, blocksize=16)  # 8 rows of 64: 4 row blocks each, 8-bit state
        for make in (lambda ps: SGDSaI(ps, lr=1e-2, state_bits=8, stochastic_rounding=False, **small),
                     lambda ps: memopt.AdamW8bit(ps, lr=1e-2, **small)):
            plain = torch.nn.Parameter(w0.clone())
            sharded = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
            opt_plain, opt_sharded = make([plain]), make([sharded])
            for g in grads:
                plain.grad = g.clone()
                sharded.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                opt_plain.step()
                opt_sharded.step()
            assert any(v.dtype == torch.uint8 for v in opt_sharded.state[sharded].values() if torch.is_tensor(v))
            torch.testing.assert_close(sharded.detach().full_tensor(), plain.detach(), rtol=0, atol=1e-6)
    finally:
        if created:
            dist.destroy_process_group()
