import os

# Two threads on a shared 2-core machine are several times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "inductor"))

import torch  # noqa: E402

torch.set_num_threads(1)

# Triton kernels run on CPU tensors in the interpreter; must be set before any @triton.jit function runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
