"""ReLoRA: high-rank training through low-rank updates (Lialin et al., ICLR 2024).

Pure PyTorch, usable from any training loop; see README.md for a worked loop.
"""

from relora.flops import mfu, peak_flops, train_flops_per_token
from relora.layers import (
    LLAMA_TARGET_MODULES,
    HyperparameterError,
    MergeResult,
    ReLoRALinear,
    adapter_parameters,
    merge,
    merge_and_reinit,
    relora_layers,
    unwrap,
    wrap,
)
from relora.memory import memory_breakdown
from relora.models import MODEL_SHAPES, build_model, model_config
from relora.optim import param_groups, reset_optimizer_state
from relora.rank import effective_weights, update_rank, update_ranks
from relora.recipe import METHODS, PROJECTION_TYPES, ReLoRAConfig
from relora.restarts import RestartResult, make_optimizer, optimizer_of, restart
from relora.schedule import cosine_envelope, jagged_cosine, jagged_cosine_scheduler

__version__ = "0.1.0"

__all__ = [
    "HyperparameterError",
    "LLAMA_TARGET_MODULES",
    "METHODS",
    "MODEL_SHAPES",
    "MergeResult",
    "PROJECTION_TYPES",
    "ReLoRAConfig",
    "ReLoRALinear",
    "RestartResult",
    "adapter_parameters",
    "build_model",
    "cosine_envelope",
    "effective_weights",
    "jagged_cosine",
    "jagged_cosine_scheduler",
    "make_optimizer",
    "mfu",
    "memory_breakdown",
    "merge",
    "merge_and_reinit",
    "model_config",
    "optimizer_of",
    "param_groups",
    "peak_flops",
    "relora_layers",
    "reset_optimizer_state",
    "restart",
    "train_flops_per_token",
    "unwrap",
    "update_rank",
    "update_ranks",
    "wrap",
]
