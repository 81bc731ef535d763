"""Supervised fine-tuning with TRL's SFTTrainer and a memopt optimizer, launched by accelerate.

    accelerate launch examples/sft_trl.py --optim sgdsai --output_dir runs/sft
    accelerate launch --multi_gpu --num_processes 2 examples/sft_trl.py --optim sgdsai_8bit --output_dir runs/sft
    # on a CPU-only machine add --use_cpu true (gloo)

Every ``SFTConfig`` / ``TrainingArguments`` flag works (``--optim``, ``--optim_args``, ``--learning_rate``,
``--max_steps``, ``--lr_scheduler_type``, ...); ``import memopt`` makes the memopt names valid ``--optim`` choices and
adds the memory report, printed at the end and written to ``<output_dir>/memory_report.{json,png}``. Script
arguments: ``--model_name_or_path`` (default: the offline SmolLM2-135M-Instruct of the demo), ``--corpus``
(``pydoc`` or ``lee``), ``--text_chars`` (characters per training example). Needs ``trl`` (and ``datasets``,
which it brings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import memopt  # noqa: E402,F401  (registers optim="sgdsai" and the other memopt names with transformers)

from memopt.demo import CORPORA, DEFAULT_MODEL, end_process_group, resolve_model_path  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": f"'{DEFAULT_MODEL}' (the offline GGUF demo model) or a local save_pretrained directory"})
    corpus: str = field(default="pydoc", metadata={"help": f"training text, one of {sorted(CORPORA)}"})
    text_chars: int = field(default=600, metadata={"help": "characters per training example"})


def text_dataset(corpus: str, chars: int):
    """The corpus cut into examples of about ``chars`` characters (at paragraph breaks), as a datasets.Dataset."""
    import datasets

    pieces, current = [], ""
    for paragraph in CORPORA[corpus]().split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= chars:
            pieces.append(current[: 2 * chars])
            current = ""
    return datasets.Dataset.from_dict({"text": pieces})


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
    from trl import SFTConfig, SFTTrainer

    script, config = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses(argv)
    if script.corpus not in CORPORA:
        raise SystemExit(f"--corpus {script.corpus!r} is not one of {sorted(CORPORA)}")
    path = resolve_model_path(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = SFTTrainer(model=model, args=config, train_dataset=text_dataset(script.corpus, script.text_chars),
                         processing_class=tokenizer)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        optim = getattr(config.optim, "value", config.optim)
        print(f"[sft_trl] optim={optim} steps={trainer.state.global_step} "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    end_process_group()


if __name__ == "__main__":
    main()
