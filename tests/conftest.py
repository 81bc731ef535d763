import os

# Two threads on a shared 2-core machine are several times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "inductor"))

import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels run on CPU tensors in the interpreter (set before any @triton.jit runs);
# with one, the same parity tests run the compiled kernels on CUDA tensors (see KERNEL_DEVICE).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


import random  # noqa: E402

import pytest  # noqa: E402

SEED = 0


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same RNG state, whatever ran before it: a test that draws without its own
    generator still sees the same numbers on every run, in any order or selection."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    try:
        import numpy

        numpy.random.seed(SEED)
    except ImportError:  # numpy is optional for the package; the test extra brings it
        pass
    yield
