"""Tiny models, tokenizers and data for tests (built from configs: no download, seconds on CPU)."""

from __future__ import annotations

import string

import torch


def tiny_llama(seed: int = 0, vocab_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


class PatternDataset(torch.utils.data.Dataset):
    """Sequences of a repeating pattern with a random offset: learnable in a few dozen steps."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        period = 7
        base = torch.arange(3, 3 + period)
        starts = torch.randint(0, period, (n,), generator=g)
        idx = (starts[:, None] + torch.arange(seq_len)[None, :]) % period
        self.ids = base[idx] % vocab_size

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def char_tokenizer():
    """A character-level fast tokenizer built in memory (for TRL, which wants a processing class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + " .,")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_params(*shapes, seed: int = 0):
    """fp32 parameters of the given shapes, 0.1 x normal, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(s, generator=g)) for s in shapes]


def make_grads(shapes, steps: int, seed: int = 1):
    """``steps`` lists of gradients (1e-2 x normal) for parameters of ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(steps)]


def run_steps(opt, params, grads):
    """Set each step's gradients and step the optimizer."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def switch_cpu_loops(monkeypatch, on: bool) -> None:
    """Turn memopt's fused CPU loops on or off for the rest of a test: the variable, and the loaded library
    forgotten so that the next update reads the variable again (both restored by ``monkeypatch``)."""
    from memopt.kernels import cpu

    monkeypatch.setenv("MEMOPT_CPU_KERNELS", "1" if on else "0")
    monkeypatch.setattr(cpu, "_LIB", {})


def free_port() -> int:
    """A TCP port free right now on localhost, for a launcher's rendezvous (a fixed or pid-derived port can still
    be held by the previous launch or collide with accelerate's default 29500)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leave_distributed_run() -> None:
    """End a launched test process after its results are written: destroy the process group, flush, and exit
    without the interpreter's teardown. With gloo on CPU (torch 2.13) a rank occasionally aborts in that teardown
    ("terminate called without an active exception", SIGABRT) after everything it had to do succeeded, which
    would fail the launch although the run was right."""
    import os
    import sys

    from memopt.demo import end_process_group

    end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
