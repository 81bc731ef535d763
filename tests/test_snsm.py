"""Subset-Norm + Subspace-Momentum: SM limit, SN statistic, state bytes, Trainer names."""

import io

import pytest
import torch

import memopt
from tiny import make_grads, make_params, run_steps
from memopt import SubsetNormSM
from memopt.optim.snsm import subset_sum_sq


_params, _grads, _run = make_params, make_grads, run_steps


def test_sgd_sm_at_full_rank_equals_sgd_momentum():
    # SGD with EMA momentum started at zero (the paper's form): m = β m + (1 − β) g; x -= lr m
    shapes = [(12, 8)]
    (b,) = _params(*shapes)
    want = b.detach().clone()
    grads = _grads(shapes, 6)
    _run(SubsetNormSM([b], lr=0.1, rank=8, subset_norm=False, update_gap=1000), [b], grads)
    m = torch.zeros(shapes[0])
    for (g,) in grads:
        m = 0.9 * m + 0.1 * g
        want = want - 0.1 * m
    torch.testing.assert_close(b.detach(), want, atol=1e-6, rtol=1e-5)


def test_subspace_momentum_steps_along_its_momentum_in_the_subspace_and_the_gradient_outside_it():
    # numerator Up(m) + (G - Up(R)) at a rank below full: two steps, the basis kept (update_gap 1000)
    from memopt.functional import projection as proj

    shape = (12, 8)
    (w,) = _params(shape)
    opt = SubsetNormSM([w], lr=0.1, rank=3, subset_norm=False, update_gap=1000)
    for (g,) in _grads([shape], 2):
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        st = opt.state[w]
        low = proj.down(st, g, "svd")
        want = before - 0.1 * (proj.up(st, st["sm"], shape, "svd") + (g - proj.up(st, low, shape, "svd")))
        torch.testing.assert_close(w.detach(), want, atol=1e-6, rtol=1e-5)
    assert st["sm"].shape != shape  # the momentum lives in the subspace


def test_subset_norm_statistic_and_one_step():
    g = torch.arange(12.0).view(4, 3)
    assert torch.equal(subset_sum_sq(g), (g * g).sum(1, keepdim=True))  # m >= n: per row
    assert subset_sum_sq(g.t()).shape == (1, 4)  # m < n: per column
    (w,) = _params((4, 3))
    w0 = w.detach().clone()
    opt = SubsetNormSM([w], lr=1e-2, subspace_momentum=False, eps=1e-6)
    w.grad = g.clone()
    opt.step()
    # first step: m̂ = g, v̂ = row sums of g², x -= lr * g / (sqrt(v̂) + eps)
    want = w0 - 1e-2 * g / ((g * g).sum(1, keepdim=True).sqrt() + 1e-6)
    torch.testing.assert_close(w.detach(), want)
    assert opt.state[w]["sn"].shape == (4, 1)


def test_state_bytes_formula_and_plain_adam_for_vectors():
    w, b = _params((40, 24), (24,))
    opt = SubsetNormSM([w, b], rank=4)
    _run(opt, [w, b], _grads([(40, 24), (24,)], 2))
    big_m, mu, r = 40, 24, 4
    assert memopt.state_bytes(opt) == 4 * (big_m + r * big_m + r * mu) + 4 * 2 * 24


def test_resume_and_refusals():
    shapes = [(16, 10)]
    grads = _grads(shapes, 6)
    a = _params(*shapes)
    _run(SubsetNormSM(a, rank=3, update_gap=2), a, grads)
    b = _params(*shapes)
    ob = SubsetNormSM(b, rank=3, update_gap=2)
    _run(ob, b, grads[:3])
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    c = [torch.nn.Parameter(t.detach().clone()) for t in b]
    oc = SubsetNormSM(c, rank=3, update_gap=2)
    oc.load_state_dict(torch.load(buf, weights_only=True))
    _run(oc, c, grads[3:])
    assert torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="2-D"):
        SubsetNormSM([{"params": _params((8,)), "project": True}])
    with pytest.raises(ValueError, match="rank"):
        SubsetNormSM(_params((4, 4)), rank=0)


@pytest.mark.parametrize("name", ["adamsn", "adamsnsm", "sgdsm"])
def test_trainer_names_train(tmp_path, name):
    from tiny import PatternDataset, tiny_llama
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    lr = 0.3 if name == "sgdsm" else 1e-2
    args = TrainingArguments(output_dir=str(tmp_path), optim=name, optim_args="rank=4,update_gap=5", learning_rate=lr,
                             max_steps=20, per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=PatternDataset())
    trainer.train()
    opt = trainer.optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for g in opt.param_groups if g["project"] is True for p in g["params"]}
    assert "lm_head.weight" in projected  # untied LM head included, embeddings not
    assert "model.embed_tokens.weight" not in projected
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
