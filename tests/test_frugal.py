"""FRUGAL: limits that pin the math, refresh, resume, refusals, state bytes."""

import io

import pytest
import torch

import memopt
from tiny import make_grads, make_params, run_steps
from memopt.optim.frugal import FRUGAL, GaLoreAdamW


_params, _grads, _run = make_params, make_grads, run_steps


def test_density_one_with_columns_equals_adamw():
    shapes = [(24, 16)]
    a, b = _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 6)
    _run(torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, foreach=False), a, grads)
    _run(FRUGAL(b, lr=1e-2, weight_decay=0.1, density=1.0, selection="columns"), b, grads)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-6)


def test_density_zero_is_sign_sgd_with_decoupled_decay():
    shapes = [(12, 9)]
    a = _params(*shapes)
    ref = a[0].detach().clone()
    grads = _grads(shapes, 4)
    opt = FRUGAL(a, lr=1e-3, weight_decay=0.1, density=0.0)
    _run(opt, a, grads)
    for (g,) in grads:
        ref = ref * (1 - 1e-3 * 0.1) - 1e-3 * g.sign()
    torch.testing.assert_close(a[0].detach(), ref, atol=1e-7, rtol=0)
    assert memopt.state_bytes(opt) == 0


def test_state_free_none_leaves_unselected_columns_to_decay_only():
    (p,) = _params((20, 40))
    p0 = p.detach().clone()
    opt = FRUGAL([p], lr=1e-2, weight_decay=0.0, density=0.25, selection="columns", state_free="none")
    _run(opt, [p], _grads([(20, 40)], 1))
    idx = opt.state[p]["proj_indices"].long()
    moved = (p.detach() != p0).any(dim=0)
    assert moved[idx].all() and moved.sum() == idx.numel()


def test_refresh_resets_the_inner_state_and_non_projectable_groups_get_adamw():
    w, b = _params((16, 8), (8,))
    opt = FRUGAL([w, b], lr=1e-3, update_gap=3, selection="svd")  # "auto": the 1-D bias gets AdamW
    _run(opt, [w, b], _grads([(16, 8), (8,)], 4))
    assert opt.state[w]["refreshes"] == 2 and opt.state[w]["step"] == 1  # refreshed at 0 and 3, step restarted
    assert opt.state[b]["step"] == 4 and opt.state[b]["exp_avg"].shape == (8,)


def test_state_bytes_follow_the_formula():
    (w,) = _params((64, 32))
    opt = FRUGAL([w], density=0.25, selection="columns")
    _run(opt, [w], _grads([(64, 32)], 1))
    k = 8
    assert memopt.state_bytes(opt) == 2 * 64 * k * 4 + k * 4  # m, v in the subspace + int32 indices
    (w2,) = _params((64, 32))
    opt2 = FRUGAL([w2], density=0.25, selection="random")
    _run(opt2, [w2], _grads([(64, 32)], 1))
    r = 8
    assert memopt.state_bytes(opt2) == 2 * r * 64 * 4 + r * 32 * 4  # b(2 r M + r mu)


def _assert_resume_bit_identical(shapes, kw):
    """4 steps, a weights_only save/load into a fresh optimizer, 3 more steps == 7 straight steps, bit for bit."""
    grads = _grads(shapes, 7)
    torch.manual_seed(0)
    a = _params(*shapes)
    _run(FRUGAL(a, **kw), a, grads)
    torch.manual_seed(0)
    b = _params(*shapes)
    ob = FRUGAL(b, **kw)
    _run(ob, b, grads[:4])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    rng = torch.get_rng_state()  # index selections draw their seed from torch's RNG (the Trainer restores it)
    c = [torch.nn.Parameter(t.detach().clone()) for t in b]
    oc = FRUGAL(c, **kw)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    torch.set_rng_state(rng)
    _run(oc, c, grads[4:])
    for x, y in zip(a, c):
        assert torch.equal(x, y)


@pytest.mark.parametrize("selection,on_refresh", [("random", "reset"), ("columns", "keep"), ("svd", "reproject")])
def test_resume_bit_identical(selection, on_refresh):
    _assert_resume_bit_identical([(24, 12)], dict(lr=1e-2, density=0.5, selection=selection, update_gap=3,
                                                  on_refresh=on_refresh))


def test_refusals():
    with pytest.raises(ValueError, match="2-D"):
        FRUGAL([{"params": _params((8,)), "project": True}])  # e.g. a DeepSpeed-flattened partition
    FRUGAL([{"params": _params((8,)), "project": False}])
    with pytest.raises(ValueError, match="project"):
        FRUGAL([{"params": _params((8, 8)), "project": "yes"}])
    with pytest.raises(ValueError, match="density"):
        FRUGAL(_params((4, 4)), density=1.5)
    with pytest.raises(ValueError, match="state_free"):
        FRUGAL(_params((4, 4)), state_free="adam")
    with pytest.raises(ValueError, match="reproject"):
        FRUGAL(_params((4, 4)), selection="columns", on_refresh="reproject")


def _trainer(tmp_path, **kw):
    from tiny import PatternDataset, tiny_llama
    from transformers import Trainer, TrainingArguments

    base = dict(output_dir=str(tmp_path), optim="frugal", learning_rate=3e-3, max_steps=20,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                seed=0, disable_tqdm=True, lr_scheduler_type="constant", weight_decay=0.01,
                optim_args="density=0.25,update_gap=5")
    base.update(kw)
    model = kw.pop("model", None) or tiny_llama()
    base.pop("model", None)
    return model, Trainer(model=model, args=TrainingArguments(**base), train_dataset=PatternDataset())


def test_trainer_frugal_groups_follow_optim_target_modules(tmp_path):
    model, trainer = _trainer(tmp_path)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for g in opt.param_groups if g["project"] is True for p in g["params"]}
    assert projected and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj") for n in projected)
    rest = {names[id(p)] for g in opt.param_groups if g["project"] is False for p in g["params"]}
    assert "model.embed_tokens.weight" in rest and "lm_head.weight" in rest
    no_decay = [p for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert no_decay and all("norm" in names[id(p)] for p in no_decay)
    _, t2 = _trainer(tmp_path, optim_target_modules=r".*\.mlp\.up_proj")
    projected2 = [p for g in t2.create_optimizer().param_groups if g["project"] is True for p in g["params"]]
    assert len(projected2) == 2  # one up_proj per layer
    _, t3 = _trainer(tmp_path, optim_target_modules=["not_a_module"])
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        t3.create_optimizer()


def test_trainer_frugal_trains_and_resumes_exactly(tmp_path):
    _, trainer = _trainer(tmp_path)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    n = 6
    _, straight = _trainer(tmp_path / "a", max_steps=2 * n, save_strategy="steps", save_steps=n)
    straight.train()
    want = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    from tiny import tiny_llama

    _, resumed = _trainer(tmp_path / "a", max_steps=2 * n, model=tiny_llama(seed=9))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{n}"))
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > n}
    assert got and all(got[s] == want[s] for s in got), (got, want)


def test_galore_full_rank_alpha_one_is_adamw_in_the_rotated_basis():
    from memopt import GaLoreAdamW

    shapes = [(6, 4)]
    (w,) = _params(*shapes)
    w0 = w.detach().clone()
    grads = _grads(shapes, 5)
    opt = GaLoreAdamW([w], lr=1e-2, weight_decay=0.1, rank=4, alpha=1.0, update_gap=1000)
    _run(opt, [w], grads)
    P = opt.state[w]["proj_basis"]  # 4x4 orthogonal (right side), fixed after the first step
    rotated = torch.nn.Parameter(w0 @ P.t())
    adam = torch.optim.AdamW([rotated], lr=1e-2, weight_decay=0.1, foreach=False)
    for (g,) in grads:
        rotated.grad = g @ P.t()
        adam.step()
    torch.testing.assert_close(w.detach(), rotated.detach() @ P, atol=1e-5, rtol=1e-5)
    assert memopt.state_bytes(opt) == 2 * 4 * 6 * 4 + 4 * 4 * 4  # b(2 r M + r mu)


def test_trainer_memopt_galore_trains(tmp_path):
    _, trainer = _trainer(tmp_path, optim="memopt_galore", optim_args="rank=4,alpha=1.0,update_gap=5")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("optim", ["frugal", "memopt_galore", "adamsnsm"])
def test_peft_lora_adapters_train_with_documented_projection(tmp_path, optim):
    import peft
    from tiny import tiny_llama

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, trainer = _trainer(tmp_path, model=model, optim=optim, optim_args=None, learning_rate=1e-2, max_steps=4)
    trainer.train()
    opt = trainer.optimizer.optimizer
    projected = [p for g in opt.param_groups if g["project"] is True for p in g["params"]]
    if optim == "adamsnsm":  # SN-SM's default is every linear: the adapters are linears (full rank at r=4)
        assert len(projected) == len(before)
    else:  # attention/MLP targets match no trainable weight: the adapters get the inner optimizer unprojected
        assert not projected
    after = dict(model.named_parameters())
    assert not [n for n, p in before.items() if torch.equal(after[n].detach(), p)]


def test_sai_scaled_state_free_update():
    from memopt.functional import gsnr

    big, small = _params((32, 32), (8, 4))
    b0, s0 = big.detach().clone(), small.detach().clone()
    grads = _grads([(32, 32), (8, 4)], 1)
    opt = FRUGAL([big, small], lr=1e-2, weight_decay=0.0, density=0.0, free_scale="sai")
    _run(opt, [big, small], grads)
    s_big, s_small = gsnr(grads[0][0]), gsnr(grads[0][1])
    assert s_big > s_small
    torch.testing.assert_close(big.detach(), b0 - 1e-2 * grads[0][0].sign())  # the max moves at lr
    torch.testing.assert_close(small.detach(), s0 - 1e-2 * (s_small / s_big) * grads[0][1].sign())
    with pytest.raises(ValueError, match="free_scale"):
        FRUGAL(_params((4, 4)), free_scale="adam")


# ---------------------------------------------------------------------------------------------- inner options
def test_density_one_with_sgdsai_inner_equals_sgdsai():
    shapes = [(24, 16), (16,)]
    a, b = _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 6)
    # FRUGAL's inner SGD-SaI is the paper's (gsnr_max: momentum of the raw gradient, SaI scale)
    _run(memopt.SGDSaI(a, lr=1e-2, momentum=0.9, weight_decay=0.1, scale="gsnr_max"), a, grads)
    _run(FRUGAL(b, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, density=1.0, selection="columns",
                inner="sgdsai"), b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)


def test_density_one_with_8bit_inner_equals_memopt_adamw_8bit():
    shapes = [(64, 80)]  # 5120 elements >= min_8bit_size: quantized
    a, b = _params(*shapes), _params(*shapes)
    grads = _grads(shapes, 5)
    oa = memopt.AdamW8bit(a, lr=1e-2, weight_decay=0.1, use_triton=False)
    ob = FRUGAL(b, lr=1e-2, weight_decay=0.1, density=1.0, selection="columns", state_bits=8)
    _run(oa, a, grads)
    _run(ob, b, grads)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-5)
    sa, sb = oa.state[a[0]], ob.state[b[0]]
    assert sb["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in sb
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):  # the moments are the same codes
        assert (sa[key].int() - sb[key].int()).abs().max() <= 1


def test_8bit_subspace_state_bytes_follow_the_formula():
    (w,) = _params((256, 64))
    opt = FRUGAL([w], density=0.5, selection="random", state_bits=8, min_8bit_size=1024)
    _run(opt, [w], _grads([(256, 64)], 2))
    r, big, mu = 32, 256, 64
    blocks = -(-r * big // 256)
    # two 8-bit moments (r x M codes + fp32 absmax per 256) + the fp32 basis (r x mu)
    assert memopt.state_bytes(opt) == 2 * (r * big + 4 * blocks) + 4 * r * mu
    (wide,) = _params((270, 265))  # state 270 x 260: rows of 260 elements, two blocks each (256 + 4)
    opt_rows = FRUGAL([wide], rank=260, selection="random", state_bits=8, min_8bit_size=1024)
    _run(opt_rows, [wide], _grads([(270, 265)], 1))
    assert memopt.state_bytes(opt_rows) == 2 * (260 * 270 + 4 * 270 * 2) + 4 * 260 * 265
    (small,) = _params((16, 8))  # below min_8bit_size: fp32 moments
    opt2 = FRUGAL([small], density=0.5, selection="random", state_bits=8)
    _run(opt2, [small], _grads([(16, 8)], 1))
    assert opt2.state[small]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(state_bits=8, selection="svd", on_refresh="reproject"),
                                dict(inner="sgdsai", selection="columns", on_refresh="keep"),
                                dict(selection="blocks", block_order="descending")])
def test_inner_options_resume_bit_identical(kw):
    _assert_resume_bit_identical([(48, 96), (24, 12), (12, 24), (12,)],
                                 dict(lr=1e-2, density=0.5, update_gap=3, min_8bit_size=256, **kw))


def test_blocks_selection_keeps_state_only_for_active_tensors():
    shapes = [(8, 6)] * 4 + [(6,)]
    ps = _params(*shapes)
    p0 = [p.detach().clone() for p in ps]
    grads = _grads(shapes, 1)
    opt = FRUGAL(ps, lr=1e-2, weight_decay=0.0, density=0.5, selection="blocks", block_order="descending",
                 update_gap=2)
    _run(opt, ps, grads)
    with_state = [i for i, p in enumerate(ps[:4]) if "exp_avg" in opt.state[p]]
    assert with_state == [2, 3]  # descending: the last tensors first
    for i in (0, 1):  # inactive: state-free sign-SGD on the whole gradient
        torch.testing.assert_close(ps[i].detach(), p0[i] - 1e-2 * grads[0][i].sign())
    assert "exp_avg" in opt.state[ps[4]]  # not projectable: always the inner optimizer
    assert memopt.state_bytes(opt) == 2 * 2 * 48 * 4 + 2 * 6 * 4  # active tensors only
    _run(opt, ps, _grads(shapes, 2, seed=5))  # round 1 (steps 2-3): the next two, the old ones freed
    assert [i for i, p in enumerate(ps[:4]) if "exp_avg" in opt.state[p]] == [0, 1]


def test_inner_option_refusals():
    with pytest.raises(ValueError, match="inner"):
        FRUGAL(_params((4, 4)), inner="adam")
    with pytest.raises(ValueError, match="block_order"):
        FRUGAL(_params((4, 4)), selection="blocks", block_order="ascending")
    with pytest.raises(ValueError, match="not rank"):
        FRUGAL(_params((4, 4)), selection="blocks", rank=2)
    with pytest.raises(ValueError, match="selection='random'"):  # a rank with the default selection says what to do
        FRUGAL(_params((4, 4)), rank=2)
    with pytest.raises(ValueError, match="reproject"):
        FRUGAL(_params((4, 4)), selection="blocks", on_refresh="reproject")
    with pytest.raises(ValueError, match="state_bits"):
        FRUGAL(_params((4, 4)), state_bits=4)
    with pytest.raises(ValueError, match="check_finite"):
        FRUGAL(_params((4, 4)), state_bits=8, check_finite=False)
    with pytest.raises(ValueError, match="blocksize"):
        FRUGAL(_params((4, 4)), state_bits=8, blocksize=100)
    with pytest.raises(ValueError, match="density or rank, not both"):
        FRUGAL(_params((4, 4)), selection="random", density=0.5, rank=2)
    with pytest.raises(ValueError, match="exactly one of rank and density"):  # at construction, not at a step
        FRUGAL([{"params": _params((4, 4)), "density": None}], selection="random")
    with pytest.raises(ValueError, match="exactly one of rank and density"):
        FRUGAL([{"params": _params((4, 4)), "rank": 2}], selection="random")  # the default density too
    with pytest.raises(ValueError, match="density or rank, not both"):
        GaLoreAdamW(_params((4, 4)), density=0.5, rank=2)
    with pytest.raises(ValueError, match="alpha=-1"):  # named as the caller wrote it
        GaLoreAdamW(_params((4, 4)), alpha=-1)


def test_galore_takes_a_density_instead_of_its_default_rank():
    shape = (32, 48)
    for kwargs, rank in (({}, 32), ({"density": 0.5}, 16), ({"rank": 8}, 8)):  # default 128, clamped to 32
        (w,) = _params(shape)
        opt = GaLoreAdamW([w], lr=1e-2, **kwargs)
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        opt.step()
        assert tuple(opt.state[w]["proj_basis"].shape) == (shape[0], rank), kwargs


def test_sgdsai_inner_defers_a_zero_gradient_tensor():
    w, z = _params((8, 8), (8, 8))
    z0 = z.detach().clone()
    opt = FRUGAL([w, z], lr=1e-2, weight_decay=0.0, inner="sgdsai", state_free="none", selection="random")
    w.grad, z.grad = torch.randn(8, 8), torch.zeros(8, 8)
    opt.step()
    assert torch.equal(z.detach(), z0) and "gsnr" not in opt.state[z]
    w.grad, z.grad = torch.randn(8, 8), torch.randn(8, 8)
    opt.step()
    assert "gsnr" in opt.state[z] and not torch.equal(z.detach(), z0)


@pytest.mark.parametrize("optim,args", [("frugal_8bit", "density=0.25,update_gap=5,min_8bit_size=256"),
                                        ("frugal_sgdsai", "density=0.25,update_gap=5"),
                                        ("frugal", "selection=blocks,density=0.5,update_gap=5"),
                                        ("memopt_galore_8bit", "rank=4,alpha=1.0,update_gap=5,min_8bit_size=64"),
                                        ("memopt_galore", "rank=4,alpha=1.0,update_gap=5"),
                                        ("adamsnsm", "rank=4,update_gap=5"), ("adamsn", "rank=4"),
                                        ("sgdsm", "rank=4,update_gap=5")])
def test_trainer_variants_train_and_resume_exactly(tmp_path, optim, args):
    from tiny import tiny_llama

    lr = {"frugal_sgdsai": 3e-2, "adamsnsm": 1e-2, "adamsn": 1e-2, "sgdsm": 0.3}.get(optim, 3e-3)
    kw = dict(optim=optim, optim_args=args, learning_rate=lr)
    n = 6
    _, straight = _trainer(tmp_path / "a", max_steps=2 * n, save_strategy="steps", save_steps=n, **kw)
    straight.train()
    want = {h["step"]: h["loss"] for h in straight.state.log_history if "loss" in h}
    assert want[2 * n] < 0.9 * want[1]
    _, resumed = _trainer(tmp_path / "a", max_steps=2 * n, model=tiny_llama(seed=9), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{n}"))
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > n}
    assert got and all(got[s] == want[s] for s in got), (got, want)


def test_blocks_keep_exactly_the_active_count_when_a_gradient_is_missing():
    shapes = [(8, 6)] * 4
    ps = _params(*shapes)
    opt = FRUGAL(ps, lr=1e-2, density=0.5, selection="blocks", block_order="descending", update_gap=2)
    for step, gs in enumerate(_grads(shapes, 8)):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (step == 0 and i == 0) else g.clone()
        opt.step()
        holding = [i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]]
        assert len(holding) == 2, (step, holding)


def test_galore_alpha_and_its_deprecated_name_scale():
    a, b = _params((24, 16)), _params((24, 16))
    grads = _grads([(24, 16)], 3)
    _run(GaLoreAdamW(a, lr=1e-2, rank=4, alpha=0.5), a, grads)
    with pytest.warns(FutureWarning, match="now called alpha"):
        old = GaLoreAdamW(b, lr=1e-2, rank=4, scale=0.5)
    _run(old, b, grads)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", ["frugal", "memopt_galore", "adamsnsm"])
def test_projection_optimizers_round_bf16_writes_stochastically_by_default(name):
    p = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt_sr = memopt.create_optimizer(name, [p], lr=1e-4, weight_decay=0.0)
    opt_rn = memopt.create_optimizer(name, [q], lr=1e-4, weight_decay=0.0, stochastic_rounding=False)
    assert opt_sr.defaults["stochastic_rounding"] is True
    for _ in range(3):  # lr 1e-4 steps are far below half a bf16 ulp at 1.0 (2^-8)
        p.grad = torch.full_like(p, 1.0)
        q.grad = torch.full_like(q, 1.0)
        opt_sr.step()
        opt_rn.step()
    assert torch.equal(q, torch.ones_like(q))  # round to nearest: the updates vanish
    assert not torch.equal(p, torch.ones_like(p))  # stochastic rounding: some weights move
    with pytest.raises(ValueError, match="stochastic_rounding"):
        memopt.create_optimizer(name, [p], stochastic_rounding="yes")
