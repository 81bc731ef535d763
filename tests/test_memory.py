import torch

import memopt
from memopt.memory import DeviceMemory, format_table, measure


def _params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(17, 5), (9,), (3, 3, 3)]]


def test_adamw_baseline_rule_matches_a_real_adamw_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        ps = _params(dtype)
        opt = torch.optim.AdamW(ps, foreach=True)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        assert memopt.state_bytes(opt) == memopt.adamw_state_bytes(ps)


def test_state_bytes_by_kind_separates_host_scalars():
    ps = _params(torch.float32)
    opt = memopt.SGDSaI(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    kinds = memopt.state_bytes_by_kind(opt)
    n = sum(p.numel() for p in ps)
    assert kinds == {"momentum_buffer": 4 * n, "host_scalars": 8 * len(ps)}
    assert memopt.state_bytes(opt) == 4 * n


def test_measure_and_table():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)
    opt = memopt.SGDSaI([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    row = measure(model, opt)
    assert row.params_frozen_bytes == 8 * 2 * 4
    assert row.params_trainable_bytes == (4 * 8 + 8 + 2) * 4 == row.grads_bytes == row.optimizer_state_bytes
    assert row.state_saving_bytes == row.adamw_state_bytes - row.optimizer_state_bytes > 0
    text = format_table([row, DeviceMemory(**{**row.as_dict(), "rank": 1})])
    lines = text.splitlines()
    assert len(lines) == 5 and lines[3].startswith("0 ") and lines[4].startswith("1 ")
    assert "cpu_peak_rss" in text and "SGDSaI" in text


def test_report_shows_the_update_path():
    model = torch.nn.Linear(4, 4)
    opt = memopt.SGDSaI(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    row = measure(model, opt)
    assert row.update_path == "cpu:1 torch:1"  # the weight on the fused CPU update, the bias (1-D) on PyTorch's
    assert "cpu:1 torch:1" in format_table([row])


class _Wrapped(torch.Tensor):
    """A wrapper tensor subclass like torchao's 8-bit optimizer state: fp32 outside, uint8 + scales inside."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_tensor_subclasses_are_counted_by_their_inner_tensors():
    from types import SimpleNamespace

    w = _Wrapped(torch.zeros(1000, dtype=torch.uint8), torch.zeros(4))
    assert memopt.memory.tensor_bytes(w) == 1000 + 16
    fake = SimpleNamespace(state={0: {"exp_avg": w, "step": torch.tensor(1.0)}})
    assert memopt.state_bytes(fake) == 1000 + 16 + 4


def test_factored_sgdsai_state_is_one_buffer_exactly():
    from tiny import tiny_llama

    for bits in (32, 8):
        model = tiny_llama()
        opt = memopt.SGDSaI(model.parameters(), lr=1e-3, scale="factored", state_bits=bits, min_8bit_size=256)
        model(input_ids=torch.arange(3, 19).view(2, 8), labels=torch.arange(3, 19).view(2, 8)).loss.backward()
        opt.step()
        params = [p for p in model.parameters() if p.grad is not None]
        if bits == 32:
            want = 4 * sum(p.numel() for p in params)
        else:
            want = sum(p.numel() + 4 * -(-p.numel() // 256) if p.numel() >= 256 else 4 * p.numel() for p in params)
        assert memopt.state_bytes(opt) == want


def test_report_picture_and_tensorboard_scalars(tmp_path, monkeypatch):
    import matplotlib  # noqa: F401
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from tiny import PatternDataset, tiny_llama

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = TrainingArguments(output_dir=str(tmp_path), optim="sgdsai", learning_rate=1e-3, max_steps=4,
                             per_device_train_batch_size=8, logging_steps=2, save_strategy="no",
                             report_to=["tensorboard"], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=tiny_llama(), args=args, train_dataset=PatternDataset()).train()
    png = tmp_path / "memory_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("optimizer_state_bytes", "adamw_state_bytes", "state_saving_bytes", "grads_bytes"):
        assert any(t.endswith("memory/" + tag) for t in tags), tags
    state = next(t for t in tags if t.endswith("memory/optimizer_state_bytes"))
    n = sum(p.numel() for p in tiny_llama().parameters())
    assert [e.value for e in events.Scalars(state)] == [4 * n, 4 * n]  # logged at steps 2 and 4
