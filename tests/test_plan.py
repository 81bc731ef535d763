"""memopt.plan / `memopt plan`: the exact parts equal what real optimizers hold after one step on tiny
config-built models; the CLI prints the 7B table and refuses bad input with a message."""

from __future__ import annotations

import json
import math

import pytest
import torch

import memopt
from memopt import plan as planner
from memopt.cli import main
from memopt.targets import projection_groups

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def _config(tied: bool):
    from transformers import LlamaConfig

    # hidden 64: the 64x64 attention weights (4096 elements) sit exactly at min_8bit_size; k/v (32x64) below it
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=tied)


def _real_model(config, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def _backward(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


def _step(model, opt):
    _backward(model)
    opt.step()


def _meta_summary(config):
    return planner.summarize_model(planner.build_meta_model(config), source="test")


# the set-ups these tests check, as TrainingArguments(optim=..., optim_args=...) names them
_SETUPS = {"adamw": ("adamw_torch", ""), "bnb_adamw8bit": ("adamw_bnb_8bit", ""), "sgdsai": ("sgdsai", ""),
           "sgdsai_8bit": ("sgdsai_8bit", ""), "frugal": ("frugal", "density=0.25"),
           "galore": ("memopt_galore", "rank=16")}


def _predicted(config, optimizer, dtype="fp32", grad_release=False, freeze_embeddings=False, lora=False):
    optim, args = _SETUPS[optimizer]
    flags = [f for f, on in (("grad_release=true", grad_release), ("freeze_embeddings=true", freeze_embeddings)) if on]
    setup = planner.Setup("t", optim, ",".join([args, *flags]).strip(","), lora=lora)
    return planner.exact_parts(_meta_summary(config), setup, dtype)


def _actual_grads(model):
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def config(request):
    return _config(request.param)


# ----------------------------------------------------------------------------- exact parts vs real optimizers
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_adamw_state_weights_grads_exact(config, dtype):
    model = _real_model(config, torch.float32 if dtype == "fp32" else torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)
    pred = _predicted(config, "adamw", dtype)
    assert pred.state_bytes == memopt.state_bytes(opt) == memopt.adamw_state_bytes(model.parameters())
    assert pred.grads_bytes == _actual_grads(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # buffers (rotary inv_freq) follow .to(dtype) here; they are a few hundred bytes either way
    assert pred.weights_bytes == weights + sum(b.numel() for b in model.buffers()) * planner.DTYPE_BYTES[dtype]
    assert abs(pred.weights_bytes - weights - buffers) <= 4 * sum(b.numel() for b in model.buffers())
    assert pred.trainable_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sgdsai_32bit_state_exact(config, dtype):
    model = _real_model(config, torch.float32 if dtype == "fp32" else torch.bfloat16)
    opt = memopt.SGDSaI(model.parameters(), lr=1e-2)
    _step(model, opt)
    assert _predicted(config, "sgdsai", dtype).state_bytes == memopt.state_bytes(opt)


def test_sgdsai_8bit_state_exact(config):
    model = _real_model(config)
    memopt.keep_32bit_state(model.get_input_embeddings())  # what the Trainer integration does
    opt = memopt.SGDSaI(model.parameters(), lr=1e-2, state_bits=8, use_triton=False)
    _step(model, opt)
    kinds = memopt.state_bytes_by_kind(opt)
    assert kinds.get("momentum_codes") and kinds.get("momentum_buffer")  # both formats occur in this model
    assert _predicted(config, "sgdsai_8bit").state_bytes == memopt.state_bytes(opt)


def test_frugal_state_exact(config):
    model = _real_model(config)
    opt = memopt.FRUGAL(projection_groups(model, None, 0.01), lr=1e-3, density=0.25, selection="random")
    _step(model, opt)
    assert any("proj_basis" in st for st in opt.state.values())
    planned = planner.exact_parts(_meta_summary(config), planner.Setup("t", "frugal", "density=0.25,selection=random"),
                                  "fp32")
    assert planned.state_bytes == memopt.state_bytes(opt)


def test_frugal_blocks_plan_is_the_largest_active_set_and_bounds_every_step(config, monkeypatch):
    """With ``selection=blocks`` only round(rho*T) of the T projected tensors hold inner state at a time: the plan
    counts the largest such set. The real state, measured before each tensor's update over rounds that move the
    active set every step, never exceeds it: tensors leaving the active set free their state first."""
    from memopt.optim.frugal import FRUGAL

    model = _real_model(config)
    groups = projection_groups(model, None, 0.01)
    # descending: each round's tensors come before the last round's in the update order, the case where an active
    # set would grow before the old one is freed
    opt = memopt.FRUGAL(groups, lr=1e-3, density=0.25, selection="blocks", update_gap=1, block_order="descending")
    planned = planner.exact_parts(_meta_summary(config), planner.Setup("t", "frugal", "density=0.25,selection=blocks"),
                                  "fp32").state_bytes
    projected = sorted((p for g in opt.param_groups if g["project"] for p in g["params"]), key=lambda p: -p.numel())
    k = round(0.25 * len(projected))
    dense = sum(8 * p.numel() for g in opt.param_groups if not g["project"] for p in g["params"])
    assert planned == dense + sum(8 * p.numel() for p in projected[:k])  # fp32 exp_avg + exp_avg_sq
    seen = []
    inner = FRUGAL._inner_update
    monkeypatch.setattr(FRUGAL, "_inner_update", lambda self, *a: seen.append(memopt.state_bytes(self)) or inner(
        self, *a))
    for _ in range(6):
        _step(model, opt)
        opt.zero_grad()
        seen.append(memopt.state_bytes(opt))
    assert max(seen) <= planned
    assert sum(len(st) > 0 and "exp_avg" in st for p in projected for st in [opt.state[p]]) == k


def test_galore_state_exact(config):
    model = _real_model(config)
    opt = memopt.GaLoreAdamW(projection_groups(model, None, 0.01), lr=1e-3, rank=16)
    _step(model, opt)
    assert _predicted(config, "galore").state_bytes == memopt.state_bytes(opt)


@pytest.fixture
def bnb_manager():
    import bitsandbytes as bnb
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()  # a process-wide singleton: start and leave it clean
    yield bnb, manager
    manager.initialize()


def test_bnb_adamw8bit_state_exact(config, bnb_manager):
    bnb, manager = bnb_manager
    model = _real_model(config)
    # what Trainer(optim="adamw_bnb_8bit") builds: bnb AdamW(optim_bits=8) + a 32-bit override per nn.Embedding
    opt = bnb.optim.AdamW(model.parameters(), lr=1e-3, optim_bits=8)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    _step(model, opt)
    dtypes = {st["state1"].dtype for st in opt.state.values()}
    assert dtypes == {torch.uint8, torch.float32}
    assert _predicted(config, "bnb_adamw8bit").state_bytes == memopt.state_bytes(opt)


def test_frozen_embeddings_and_grad_release(config):
    model = _real_model(config)
    model.get_input_embeddings().weight.requires_grad_(False)  # a tied head is the same tensor: frozen too
    opt = memopt.SGDSaI([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, opt)
    pred = _predicted(config, "sgdsai", freeze_embeddings=True)
    assert pred.state_bytes == memopt.state_bytes(opt)
    assert pred.grads_bytes == _actual_grads(model)
    released = _predicted(config, "sgdsai", freeze_embeddings=True, grad_release=True)
    largest = max(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert released.grads_bytes == largest and released.state_bytes == pred.state_bytes


def test_grad_release_state_and_largest_grad(config):
    model = _real_model(config)
    memopt.keep_32bit_state(model.get_input_embeddings())
    opt = memopt.SGDSaI(model.parameters(), lr=1e-2, state_bits=8, grad_release=True, use_triton=False)
    _step(model, opt)
    assert all(p.grad is None for p in model.parameters())  # released inside backward
    pred = _predicted(config, "sgdsai_8bit", grad_release=True)
    assert pred.state_bytes == memopt.state_bytes(opt)
    sizes = {name: p.numel() * 4 for name, p in model.named_parameters()}
    assert opt.max_released_grad_bytes == max(sizes.values())
    if config.tie_word_embeddings:
        # the LM head's share of the tied gradient is held by autograd until the embedding's arrives, last
        emb = sizes["model.embed_tokens.weight"]
        assert pred.grads_bytes == emb + max(v for k, v in sizes.items() if k != "model.embed_tokens.weight")
    else:
        assert pred.grads_bytes == max(sizes.values())


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_lora_matches_peft(config, targets):
    import peft
    model = _real_model(config, torch.bfloat16)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(targets) if isinstance(targets, tuple)
                                                      else targets))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    _step(lora, opt)
    pred = planner.exact_parts(_meta_summary(config), planner.Setup("t", "adamw_torch", lora=True), "bf16", lora_rank=4,
                               lora_targets=targets)
    assert pred.trainable_params == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert pred.state_bytes == memopt.state_bytes(opt)
    assert pred.grads_bytes == _actual_grads(lora)
    assert pred.weights_bytes == sum(p.numel() * p.element_size() for p in lora.parameters()) + \
        2 * sum(b.numel() for b in lora.buffers())


def test_lora_unknown_target_is_refused(config):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        planner.lora_adapters(_meta_summary(config), 8, ["qproj"])


# ----------------------------------------------------------------------------- activations, sizes
def test_activation_formula_llama_7b():
    summary = planner.summarize_model(planner.build_meta_model(_llama_7b_config()), "7b")
    assert summary.gated_mlp and summary.kv_hidden_size == 4096 and summary.intermediate_size == 11008
    s, b, h, i, heads, n, v = 2048, 1, 4096, 11008, 32, 32, 32000
    per_layer = 2 * (4 * h + 4 * h) + 2 * (3 * h + 2 * h) + 8 * i  # norms, SDPA attention, SwiGLU MLP (bf16)
    off = planner.estimate_activations(summary, b, s, checkpointing=False)
    eager = planner.estimate_activations(summary, b, s, checkpointing=False, attention="eager")
    on = planner.estimate_activations(summary, b, s, checkpointing=True)
    assert off.layers_bytes == s * b * (n * per_layer + 8 * h)  # + the final norm
    assert eager.layers_bytes == int(s * b * (n * (per_layer + 5 * heads * s) + 8 * h))
    assert on.layers_bytes == s * b * (n * 2 * h + per_layer + 8 * h)
    assert off.logits_bytes == on.logits_bytes == 12 * b * s * v
    assert on.chunk_logits_bytes == 12 * (2**23 // v) * v  # one chunk of memopt.chunked_loss's auto length


def test_chunked_loss_row_only_for_supported_models():
    from transformers import AutoConfig

    llama = planner.make_plan(planner.summarize_model(planner.build_meta_model(_llama_7b_config()), "7b"))
    rows = {r.setup: r for r in llama.rows}
    lean, chunked = rows["SGD-SaI 8-bit + grad release + frozen emb"], rows[
        "SGD-SaI 8-bit + release + frozen emb + chunked loss"]
    act = llama.activations["on"]
    assert lean.exact == chunked.exact
    assert lean.peak_bytes["on"] - chunked.peak_bytes["on"] == act.logits_bytes - act.chunk_logits_bytes > 0
    gemma2 = AutoConfig.for_model("gemma2", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    other = planner.make_plan(planner.summarize_model(planner.build_meta_model(gemma2), "gemma2"))
    assert other.rows and not any("chunked" in r.setup for r in other.rows)  # chunked_loss refuses gemma2 (softcap)


def test_activation_formula_gpt_is_korthikanti():
    from transformers import GPT2Config

    summary = planner.summarize_model(planner.build_meta_model(GPT2Config(n_layer=2, n_embd=64, n_head=4)), "gpt2")
    est = planner.estimate_activations(summary, 2, 16, checkpointing=False, attention="eager")
    assert est.method == "korthikanti" and est.layers_bytes == int(2 * 16 * 2 * 64 * (34 + 5 * 4 * 16 / 64))


@pytest.mark.parametrize("dtype,act", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_activation_count_matches_saved_tensors(dtype, act):
    """The Llama count is the bytes autograd really saves (non-parameter storages; the loss saves its fp32
    log-softmax, 4 B per logit, one of the three copies of the logits peak)."""
    model = _real_model(_config(False), dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    b, s = 2, 32
    ids = torch.randint(0, 96, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    est = planner.estimate_activations(planner.summarize_model(model), b, s, checkpointing=False,
                                       bytes_per_activation=act)
    assert est.method == "llama"
    predicted = est.layers_bytes + 4 * b * s * 96
    assert 0.9 < sum(saved.values()) / predicted < 1.05


@pytest.mark.parametrize("text,expected", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("80 gb", 80 * 10**9),
                                           ("1.5GiB", 3 * 2**29), ("512MiB", 2**29), ("0", 0)])
def test_parse_size(text, expected):
    assert planner.parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "24 gigs", "GB", "-1GB", ""])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="cannot read the size"):
        planner.parse_size(text)


# ----------------------------------------------------------------------------- CLI
def _llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in LLAMA_7B.items() if k not in ("architectures", "model_type")})


@pytest.fixture
def llama_7b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    return tmp_path


def test_cli_plan_llama_7b(llama_7b_dir, capsys):
    assert main(["plan", str(llama_7b_dir), "--gpu-mem", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "6.74B params" in out and "ESTIMATE" in out
    rows = {line.split(" | ")[0].strip(): line for line in out.splitlines() if " | " in line}
    for setup in ("AdamW (torch)", "AdamW 8-bit (bnb, adamw_bnb_8bit)", "SGD-SaI 8-bit + grad release",
                  "LoRA r=8 + AdamW", "FRUGAL rho=0.25 (AdamW inner)"):
        assert setup in rows
    cells = [c.strip() for c in rows["AdamW (torch)"].split(" | ")]
    assert cells[-1].startswith("no (-") and cells[-3].startswith("no (-")  # 50 GiB of weights+grads+state
    assert [c.strip() for c in rows["LoRA r=8 + AdamW"].split(" | ")][-1].startswith("yes (+")
    fit_line = next(line for line in out.splitlines()
                    if line.startswith("fits in 24 GB") and "checkpointing on" in line)
    assert "SGD-SaI 8-bit + grad release" in fit_line and "AdamW (torch)" not in fit_line


def test_cli_plan_exact_numbers_7b(llama_7b_dir, capsys):
    main(["plan", str(llama_7b_dir / "config.json"), "--json", "--act-ckpt", "on", "--gpu-mem", "24GiB"])
    data = json.loads(capsys.readouterr().out)
    rows = {r["setup"]: r for r in data["rows"]}
    n = 6_738_415_616
    adamw = rows["AdamW (torch)"]
    assert data["model"]["numel"] == n
    assert adamw["weights_bytes"] == 2 * n + 2 * 128  # + the two 64-element rotary buffers
    assert adamw["grads_bytes"] == 2 * n and adamw["state_bytes"] == 4 * n + 4 * 291  # 291 tensors
    assert set(rows["LoRA r=8 + AdamW"]["fits"]) == {"on"}


def test_cli_bad_gpu_mem(llama_7b_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", str(llama_7b_dir), "--gpu-mem", "24 gigs"])
    assert info.value.code == 2
    assert "cannot read the size '24 gigs'" in capsys.readouterr().err


def test_cli_missing_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", str(tmp_path / "nope"), "--gpu-mem", "24GB"])
    assert info.value.code == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_cli_dir_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", str(tmp_path)])
    assert info.value.code == 2
    assert "without config.json" in capsys.readouterr().err


def test_uncached_model_name_says_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError, match="never downloads"):
        planner.load_config("memopt-test/no-such-model")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
    ({"num_hidden_layers": -2}, "num_hidden_layers=-2 must be a positive integer"),
    ({"num_attention_heads": 7}, "not a multiple of the number of attention heads|not a multiple of num_attention"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads|key_value"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"vocab_size": 1.5}, "vocab_size"),
    ({"model_type": "no_such_architecture"}, "does not recognize|no_such_architecture"),
])
def test_cli_invalid_config_values_exit_2_with_one_line(tmp_path, capsys, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_7B, **change}))
    with pytest.raises(SystemExit) as info:
        main(["plan", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("memopt plan: error:")
    import re

    assert re.search(message, err), err


def test_plan_never_runs_code_shipped_with_a_config(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code_ran"
    (tmp_path / "config.json").write_text(json.dumps({
        **LLAMA_7B, "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                       "AutoModelForCausalLM": "evil.EvilModel"}}))
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PretrainedConfig\n"
                                      "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")

    def no_prompt(*a, **k):
        raise AssertionError("memopt plan asked the user a question")

    monkeypatch.setattr("builtins.input", no_prompt)
    with pytest.raises(SystemExit) as info:
        main(["plan", str(tmp_path)])
    assert info.value.code == 2
    assert "custom code" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", memopt.list_optimizers())
def test_every_registered_name_has_a_plan_row_whose_state_is_exact(name):
    from transformers import TrainingArguments

    from memopt.integrations.transformers import optimizer_cls_and_kwargs

    config = _config(tied=False)
    summary = _meta_summary(config)
    plan = planner.make_plan(summary, planner.PlanOptions(batch=1, seq_len=16, weights_dtype="fp32"))
    rows = [r for r in plan.rows if r.optim == name and not r.lora and "grad_release" not in r.optim_args]
    assert len(rows) == 1, [r.setup for r in plan.rows]
    row = rows[0]
    # what the Trainer builds for TrainingArguments(optim=name, optim_args=row.optim_args), after one real step
    model = _real_model(config)
    args = TrainingArguments(output_dir="unused", optim=name, optim_args=row.optim_args or None, use_cpu=True,
                             report_to="none")
    cls, kwargs = optimizer_cls_and_kwargs(name, args, model=model)
    params = kwargs.pop("params", None) or [p for p in model.parameters() if p.requires_grad]
    opt = cls(params, **kwargs)
    _step(model, opt)
    if any(g.get("selection") == "blocks" for g in opt.param_groups):
        # FRUGAL's default blocks: the plan counts the largest active set, this step's draw holds at most that
        pairs = [(g, p) for g in opt.param_groups for p in g["params"]]
        largest = sum(math.prod(s) * d.itemsize for layout in opt.planned_state_layouts(pairs)
                      for s, d in layout.values())
        assert row.exact.state_bytes == largest >= memopt.state_bytes(opt) > 0
    else:
        assert row.exact.state_bytes == memopt.state_bytes(opt) > 0


# ----------------------------------------------------------------------------- several GPUs (FSDP2 full sharding)
@pytest.mark.parametrize("rows, world, want", [(10, 4, [3, 3, 3, 1]), (5, 4, [2, 2, 1, 0]), (7, 1, [7]),
                                               (1, 2, [1, 0])])
def test_shard_rows_follows_torch_chunk(rows, world, want):
    assert [planner.shard_rows(rows, world, r) for r in range(world)] == want
    chunks = [c.shape[0] for c in torch.arange(rows).chunk(world)]  # FSDP2 shards with torch.chunk
    assert want == chunks + [0] * (world - len(chunks))


# blocksize 64: the 64-wide rows of this model hold whole blocks, so their 8-bit state stays 8-bit on shards
@pytest.mark.parametrize("optim, optim_args", [("adamw_torch", ""), ("sgdsai", ""), ("sgdsai_8bit", "blocksize=64"),
                                               ("memopt_adamw_8bit", "blocksize=64"),
                                               ("frugal", "density=0.25,selection=columns"),
                                               ("frugal", "density=0.25")])
def test_ranks_add_up_to_one_device(config, optim, optim_args):
    """Sharded parameters, gradients and row-blocked state add up over the ranks to one device's bytes (torch
    AdamW's per-tensor ``step`` and FRUGAL's selected indices are on every rank; buffers too)."""
    summary = _meta_summary(config)
    setup = planner.Setup("t", optim, optim_args)
    one = planner.exact_parts(summary, setup, "fp32")
    ranks = planner.exact_parts_per_rank(summary, setup, "fp32", gpus=2)
    assert sum(r.grads_bytes for r in ranks) == one.grads_bytes
    assert sum(r.weights_bytes for r in ranks) == one.weights_bytes + 4 * summary.buffer_numel
    # FRUGAL's columns keep their indices on every rank; blocks hold whole moments, sharded with the rows
    replicated = {"adamw_torch": 4 * len(summary.params),
                  "frugal": None if "columns" in optim_args else 0}.get(optim, 0)
    total = sum(r.state_bytes for r in ranks)
    if replicated is None:
        assert one.state_bytes < total < 2 * one.state_bytes
    else:
        assert total == one.state_bytes + replicated
    assert ranks[0].state_bytes >= ranks[1].state_bytes


def test_8bit_state_of_rows_shorter_than_a_block_is_32bit_on_shards(config):
    """Blocks never span two ranks: with the default blocksize 256 the 64-wide rows of this model cannot hold one,
    so on shards their state is 32-bit (the optimizer's rule), and the plan says so."""
    summary = _meta_summary(config)
    setup = planner.Setup("t", "sgdsai_8bit", "")
    one = planner.exact_parts(summary, setup, "fp32")
    ranks = planner.exact_parts_per_rank(summary, setup, "fp32", gpus=2)
    assert sum(r.state_bytes for r in ranks) == 4 * one.trainable_params > one.state_bytes


def test_plan_on_two_gpus_lists_the_set_ups_without_a_row(config, capsys):
    plan = planner.make_plan(_meta_summary(config), planner.PlanOptions(batch=1, seq_len=16, gpus=2))
    names = {r.optim for r in plan.rows}
    assert {"adamw_torch", "sgdsai", "sgdsai_8bit", "memopt_adamw_8bit", "frugal"} <= names
    frugal = {r.optim: r.optim_args for r in plan.rows if r.optim.startswith("frugal")}
    assert not any("selection" in args for args in frugal.values())  # the default, blocks, shards
    assert not any(r.lora or "grad_release" in r.optim_args for r in plan.rows)
    skipped = dict(plan.skipped)
    assert "svd" in skipped["GaLore-style AdamW r=128"] and "bitsandbytes" in skipped["AdamW 8-bit (bnb, "
                                                                                     "adamw_bnb_8bit)"]
    assert plan.gathered_bytes > 0
    for row in plan.rows:
        assert len(row.per_rank) == 2 and row.exact == max(row.per_rank, key=lambda e: e.total)
        assert row.peak_bytes["off"] == row.exact.total + plan.activations["off"].total + plan.gathered_bytes


def test_cli_gpus(llama_7b_dir, capsys):
    assert main(["plan", str(llama_7b_dir), "--gpus", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["gpus"] == 2 and out["skipped"]
    sgdsai = next(r for r in out["rows"] if r["optim"] == "sgdsai")
    assert len(sgdsai["per_rank"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(llama_7b_dir), "--gpus", "0"])
    assert exc.value.code == 2 and "gpus=0 must be a positive int" in capsys.readouterr().err
