"""LLaMA model sizes by name: the paper's family plus tiny ones for CPUs and tests.

The paper's sizes count embeddings at a 32k vocabulary (T5 tokenizer), as the paper
does. ``vocab_size`` and ``max_position_embeddings`` follow the tokenizer and the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers' LLaMA costs 2-3 s to import: only the functions that build one do
    from transformers import LlamaConfig, LlamaForCausalLM

# name: (hidden_size, intermediate_size, num_attention_heads, num_hidden_layers)
MODEL_SHAPES: dict[str, tuple[int, int, int, int]] = {
    # Tiny models that train in seconds to minutes on a CPU.
    "llama-tiny": (64, 176, 4, 2),
    "llama-mini": (128, 352, 4, 4),
    "llama-cpu": (384, 1024, 6, 4),
    # Sizes from Table 1 of Lialin et al. (2024).
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-250m": (768, 2560, 16, 24),
    "llama-350m": (1024, 2736, 16, 24),
    "llama-1b": (2048, 5461, 32, 16),
    "llama-1.3b": (2048, 5461, 32, 24),
}


def model_config(name: str, *, vocab_size: int = 32000, max_position_embeddings: int = 1024) -> LlamaConfig:
    """The ``LlamaConfig`` of the model called ``name`` (one of ``MODEL_SHAPES``)."""
    from transformers import LlamaConfig

    if name not in MODEL_SHAPES:
        raise ValueError(f"model name {name!r} is unknown; choose one of {sorted(MODEL_SHAPES)}")
    hidden, intermediate, heads, layers = MODEL_SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        # PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels on GPUs),
        # asked for by name so that a transformers default can never change it under us.
        attn_implementation="sdpa",
    )


def build_model(name: str, *, vocab_size: int = 32000, max_position_embeddings: int = 1024) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` of the size called ``name``."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(model_config(name, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings))
