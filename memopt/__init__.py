"""memopt: memory-lean optimizers for fine-tuning, inside the Hugging Face Trainer.

``import memopt`` makes ``TrainingArguments(optim="sgdsai")`` work (registration happens when transformers'
modules load; it imports neither transformers nor triton itself).
"""

from memopt.freeze import FrozenEmbeddings, freeze_embeddings
from memopt.loss import ChunkedLoss, chunked_loss, disable_chunked_loss
from memopt.memory import adamw_state_bytes, state_bytes, state_bytes_by_kind
from memopt.optim import FRUGAL, AdamW8bit, GaLoreAdamW, Lion, SGDSaI, SubsetNormSM, keep_32bit_state
from memopt.registry import create_optimizer, get_optimizer_spec, list_optimizers, register_optimizer
from memopt.integrations import install_transformers_hooks as _install_transformers_hooks

__version__ = "0.1.0"
__all__ = [
    "AdamW8bit",
    "ChunkedLoss",
    "FRUGAL",
    "FrozenEmbeddings",
    "GaLoreAdamW",
    "Lion",
    "SGDSaI",
    "SubsetNormSM",
    "adamw_state_bytes",
    "chunked_loss",
    "create_optimizer",
    "disable_chunked_loss",
    "freeze_embeddings",
    "get_optimizer_spec",
    "keep_32bit_state",
    "list_optimizers",
    "register_optimizer",
    "state_bytes",
    "state_bytes_by_kind",
]

_install_transformers_hooks()
