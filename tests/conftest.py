"""Shared fixtures: a tiny real LlamaForCausalLM and a batch of token ids."""

from __future__ import annotations

import pytest
import torch

import relora

VOCAB = 256


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return relora.build_model("llama-tiny", vocab_size=VOCAB, max_position_embeddings=64)


@pytest.fixture
def token_batch():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
