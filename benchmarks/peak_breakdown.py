"""Where a Trainer run's peak memory happens: RSS sampled every millisecond, labelled with the phase of the step
(decoder forward, head + loss, backward, optimizer, logging), max per phase, MiB above the RSS after the imports.
A diagnostic for docs/lean.md, not a benchmark (peak_memory.py is the measurement).

    python benchmarks/peak_breakdown.py lean             # bf16 sgdsai_8bit + release + frozen embedding
    python benchmarks/peak_breakdown.py lean-chunked     # ... + chunked loss
    python benchmarks/peak_breakdown.py adamw            # torch AdamW, fp32 weights

Same model, batch, checkpointing and allocator setting (MALLOC_MMAP_THRESHOLD_=1 MiB, set here when absent) as
peak_memory.py.
"""
import os
import sys

from _common import MMAP_THRESHOLD, malloc_trim, status_kib

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start-up: re-run this script with it set
    os.execve(sys.executable, [sys.executable, *sys.argv],
              dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)))

import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from _common import load_example  # noqa: E402
finetune = load_example("finetune")
import memopt  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401
from transformers import TrainerCallback  # noqa: E402

SETTINGS = {
    "lean": ["--optim", "sgdsai_8bit", "--learning_rate", "3e-2", "--weights_dtype", "bfloat16", "--max_grad_norm",
             "0", "--optim_args", "grad_release=true,freeze_embeddings=true"],
    "lean-chunked": ["--optim", "sgdsai_8bit", "--learning_rate", "3e-2", "--weights_dtype", "bfloat16",
                     "--max_grad_norm", "0", "--optim_args",
                     "grad_release=true,freeze_embeddings=true,chunked_loss=true"],
    "adamw": ["--optim", "adamw_torch", "--learning_rate", "1e-4", "--weights_dtype", "float32"],
}


def rss_mib(field="VmRSS"):
    return status_kib(field) // 1024


def main(setting):
    base = rss_mib()
    phase, peaks, stop = ["load"], {}, []

    def sample():
        while not stop:
            r, p = rss_mib() - base, phase[0]
            peaks[p] = max(peaks.get(p, r), r)
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()
    build = finetune.build_model

    def build_and_label(args):
        model, tok = build(args)
        malloc_trim()
        phase[0] = "after load"
        decoder = model.model
        decoder.register_forward_pre_hook(lambda *a: phase.__setitem__(0, "forward: decoder"))
        decoder.register_forward_hook(lambda *a: phase.__setitem__(0, "forward: head + loss"))
        decoder.norm.register_full_backward_hook(lambda *a: phase.__setitem__(0, "backward: decoder"))
        return model, tok

    class Phases(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phase[0] = "step begin (batch)"

        def on_pre_optimizer_step(self, *a, **k):
            phase[0] = "optimizer step"

        def on_step_end(self, *a, **k):
            phase[0] = "step end"

        def on_log(self, *a, **k):
            phase[0] = "log"

    finetune.build_model = build_and_label
    argv = SETTINGS[setting] + ["--compare", "none", "--max_steps", "3", "--no-eval_before", "--no-do_eval",
                                "--logging_steps", "1", "--output_dir", tempfile.mkdtemp(), "--gradient_checkpointing"]
    finetune.run(finetune.parse_args(argv), callbacks=[Phases()])
    stop.append(True)
    time.sleep(0.01)
    print(f"\n{setting}: max RSS per phase, MiB above the RSS after imports (3 steps)")
    for p, v in peaks.items():
        print(f"  {p:<22} {v:>6}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SETTINGS:
        sys.exit(f"usage: python benchmarks/peak_breakdown.py {{{'|'.join(SETTINGS)}}}")
    main(sys.argv[1])
