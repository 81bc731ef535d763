"""memopt.AdamW8bit: 32-bit form == torch AdamW bit for bit; 8-bit form within error budgets of torch AdamW
and of bitsandbytes' AdamW8bit; state format, resume, non-finite gradients, Trainer name."""

import io

import pytest
import torch

import memopt
from memopt import AdamW8bit


def _params(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a consistent signal plus noise, so the moments carry information
    signal = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    return [[s + torch.randn(s.shape, generator=g) * 5e-3 for s in signal] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_32bit_form_equals_torch_adamw_bitwise(fused):
    """The PyTorch form (use_triton=False) is torch's single-tensor AdamW; the default CPU path runs torch's fused
    CPU kernel, as torch.optim.AdamW(fused=True) does."""
    shapes = [(64, 80), (7,)]
    a, b = _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 5)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _run(torch.optim.AdamW(a, fused=True, **kw) if fused else torch.optim.AdamW(a, foreach=False, **kw), a, grads)
    _run(AdamW8bit(b, state_bits=32, use_triton=None if fused else False, **kw), b, grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_8bit_state_format_and_bytes():
    big, small = _params((128, 64), (100,))
    opt = AdamW8bit([big, small])
    _run(opt, [big, small], _grads([(128, 64), (100,)], 1))
    kinds = memopt.state_bytes_by_kind(opt)
    assert kinds["exp_avg_codes"] == kinds["exp_avg_sq_codes"] == big.numel()
    assert kinds["exp_avg_absmax"] == kinds["exp_avg_sq_absmax"] == 4 * big.numel() // 256
    assert kinds["exp_avg"] == kinds["exp_avg_sq"] == 4 * small.numel()
    quantized = sum(kinds[k] for k in kinds if "codes" in k or "absmax" in k)
    assert quantized / big.numel() == pytest.approx(2.03125)


def test_8bit_tracks_torch_adamw_within_budget():
    shapes = [(128, 64), (4097,)]
    ref, q = _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 30)
    _run(torch.optim.AdamW(ref, lr=1e-3), ref, grads)
    _run(AdamW8bit(q, lr=1e-3), q, grads)
    for i, (a, b) in enumerate(zip(ref, q)):
        moved = (a - _params(*shapes)[i]).abs().mean()
        assert (a - b).abs().mean() < 0.05 * moved


def test_8bit_agrees_with_bitsandbytes_adamw8bit_within_budget():
    import bitsandbytes as bnb
    shapes = [(128, 64)]
    ours, theirs, ref = _params(*shapes), _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 20)
    _run(AdamW8bit(ours, lr=1e-3), ours, grads)
    _run(bnb.optim.AdamW8bit(theirs, lr=1e-3, min_8bit_size=4096), theirs, grads)
    _run(torch.optim.AdamW(ref, lr=1e-3), ref, grads)
    moved = (ref[0] - _params(*shapes)[0]).abs().mean()
    err_ours = (ours[0] - ref[0]).abs().mean()
    err_bnb = (theirs[0] - ref[0]).abs().mean()
    assert (ours[0] - theirs[0]).abs().mean() < 0.05 * moved
    assert err_ours < 2 * err_bnb + 1e-3 * moved  # no worse than bitsandbytes against the fp32 reference


def test_resume_bit_identical_and_nonfinite_skip():
    shapes = [(64, 80)]
    grads = _grads(shapes, 6)
    torch.manual_seed(0)  # bf16 writes round stochastically (default): same RNG stream for both runs
    a = _params(*shapes, dtype=torch.bfloat16)
    oa = AdamW8bit(a)
    _run(oa, a, grads)
    torch.manual_seed(0)
    b = _params(*shapes, dtype=torch.bfloat16)
    ob = AdamW8bit(b)
    _run(ob, b, grads[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    c = [torch.nn.Parameter(t.detach().clone()) for t in b]
    oc = AdamW8bit(c)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    assert oc.state[c[0]]["exp_avg_absmax"].dtype == torch.float32
    _run(oc, c, grads[3:])
    assert torch.equal(a[0], c[0])
    st = {k: v.clone() for k, v in oc.state[c[0]].items() if isinstance(v, torch.Tensor)}
    before = c[0].detach().clone()
    bad = torch.randn(64, 80, dtype=torch.bfloat16)
    bad[0, 0] = float("inf")
    c[0].grad = bad
    oc.step()
    assert torch.equal(c[0].detach(), before) and oc.nonfinite_skips == 1
    assert all(torch.equal(v, oc.state[c[0]][k]) for k, v in st.items())
    with pytest.raises(ValueError, match="not written by AdamW8bit"):
        oc.load_state_dict(memopt.SGDSaI(c).state_dict() | {"state": {0: {"momentum_buffer": torch.zeros(64, 80)}}})


@pytest.mark.parametrize("kwargs,name", [(dict(betas=(0.9, 1.0)), "betas"), (dict(lr=-1), "lr"),
                                         (dict(eps=0), "eps"), (dict(state_bits=16), "state_bits")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        AdamW8bit(_params((4,)), **kwargs)


def test_trainer_name_uses_adam_training_args(tmp_path):
    from tiny import PatternDataset, tiny_llama
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), optim="memopt_adamw_8bit", optim_args="min_8bit_size=1024",
                             learning_rate=3e-3, adam_beta2=0.95, max_steps=15, per_device_train_batch_size=8,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, AdamW8bit) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert "exp_avg" in opt.state[model.get_input_embeddings().weight]  # embeddings keep 32-bit state
    assert "exp_avg_codes" in opt.state[model.model.layers[0].mlp.up_proj.weight]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("make", [lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.0),
                                  lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.0, use_triton=False),
                                  lambda ps: memopt.FRUGAL(ps, lr=1e-3, weight_decay=0.0, density=1.0, state_bits=8)],
                         ids=["fused_cpu", "reference", "frugal_8bit"])
def test_an_outlier_in_a_block_does_not_throw_its_neighbours(make):
    # one gradient 1e4 times the others in every block: their second moments fall below the smallest code and are
    # stored as 0 while their first moments are not; a step must not divide by that 0
    grads = [torch.ones(64, 256), torch.zeros(64, 256)]
    grads[0][:, 0] = 1e4
    moves = []
    for opt_of in (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0), make):
        (w,) = [torch.nn.Parameter(torch.zeros(64, 256))]
        opt = opt_of([w])
        _run(opt, [w], [grads[:1]])
        before = w.detach().clone()
        _run(opt, [w], [grads[1:]])
        moves.append((w.detach() - before)[:, 1:].abs())
    exact, ours = moves
    assert float(ours.min()) > 0 and float(ours.max()) <= float(exact.max())  # at most exact Adam's step


def test_the_second_moment_read_map_reads_only_the_zero_code_as_the_midpoint_above_it():
    from memopt.functional.adamw import second_moment_read_map
    from memopt.functional.quantize import code_midpoints, default_code

    code = default_code(False, torch.device("cpu"))
    read = second_moment_read_map(code)
    assert code[0] == 0 and read[0] == code_midpoints(code)[0] == code[1] / 2
    assert torch.equal(read[1:], code[1:]) and code[0] == 0  # the map itself is not changed
    no_zero = torch.linspace(0.1, 1.0, 256)
    assert torch.equal(second_moment_read_map(no_zero), no_zero)
