"""The ``memopt`` command (``[project.scripts]``): ``memopt plan MODEL_OR_CONFIG --gpu-mem 24GB``.

Only argument handling and printing live here; the numbers come from :mod:`memopt.plan`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from memopt import plan as planner

_PLAN_HELP = """\
Predict the training memory of a model for several optimizer set-ups, without loading any weight: the model is
built on the meta device from its transformers config. Weights, gradients and optimizer state are exact; the
activation part is an estimate (Korthikanti et al. 2022; docs/plan.md). Works offline: never downloads."""


def _size(text: str) -> int:
    try:
        return planner.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lora_targets(text: str):
    if text == "all-linear":
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"--lora-targets {text!r}: give module names such as q_proj,v_proj or "
                                         "'all-linear'")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description="memopt command-line tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plan", help="predict training memory per optimizer set-up and whether it fits a device",
                       description=_PLAN_HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="directory holding config.json, a config JSON file, or a model name in the local HF cache")
    p.add_argument("--gpu-mem", type=_size, default=None,
                   help="device size, e.g. 24GB (10^9 B), 24GiB, 80GB; without it no 'fits' column")
    p.add_argument("--reserve", type=_size, default=planner.GiB,
                   help="bytes of the device not available to tensors (CUDA context, allocator slack), e.g. 1GiB, 0")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs under FSDP2 full sharding (accelerate launch with examples/accelerate/fsdp2.yaml): "
                        "numbers per GPU")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size per device")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length in tokens")
    p.add_argument("--weights-dtype", choices=sorted(planner.DTYPE_BYTES), default="bf16",
                   help="dtype of the weights (and of grads / torch AdamW state); fp32 = fp32 master weights")
    p.add_argument("--act-ckpt", choices=planner.ACT_CKPT_MODES, default="both",
                   help="activation (gradient) checkpointing")
    p.add_argument("--attention", choices=planner.ATTENTION_KINDS, default="sdpa",
                   help="sdpa/flash stores no s x s attention matrix; eager does")
    p.add_argument("--act-dtype", choices=sorted(planner.DTYPE_BYTES), default="bf16",
                   help="dtype of the activations (bf16 also for fp32 weights under autocast)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-targets", type=_lora_targets, default=("q_proj", "v_proj"),
                   help="comma-separated module names, or all-linear")
    p.add_argument("--density", type=float, default=0.25, help="FRUGAL density rho (subspace fraction)")
    p.add_argument("--rank", type=int, default=128, help="GaLore-style projection rank")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return parser


def run_plan(args: argparse.Namespace) -> str:
    """The text (table or JSON) of ``memopt plan`` for parsed arguments. Raises ValueError on bad input."""
    options = planner.PlanOptions(
        batch=args.batch, seq_len=args.seq_len, weights_dtype=args.weights_dtype, act_ckpt=args.act_ckpt,
        attention=args.attention, act_dtype=args.act_dtype, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
        density=args.density,
        galore_rank=args.rank, gpu_mem=args.gpu_mem, reserve=args.reserve, gpus=args.gpus,
    )
    options.validate()
    config = planner.load_config(args.model)
    summary = planner.summarize_model(planner.build_meta_model(config), source=args.model)
    plan = planner.make_plan(summary, options)
    return planner.plan_json(plan) if args.json else planner.format_plan(plan)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``memopt`` console script. Bad input exits with status 2 and a message on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers' Trainer imports peft, which imports bitsandbytes: on CPUs with AVX512-BF16 and without the
    # optional `kernels` package it logs a warning about its 4-bit CPU matmul at import; the planner runs no matmul.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.command == "plan":
        try:
            text = run_plan(args)
        except ValueError as exc:
            parser.exit(2, f"memopt plan: error: {exc}\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
