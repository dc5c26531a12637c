import pytest

import relora

# Parameter counts at a 32k vocabulary, as Table 1 of the paper names the sizes.
PAPER_SIZES = {
    "llama-60m": 60e6,
    "llama-130m": 130e6,
    "llama-250m": 250e6,
    "llama-350m": 350e6,
    "llama-1b": 1.0e9,
    "llama-1.3b": 1.3e9,
}


def _param_count(config) -> int:
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_sizes(name):
    config = relora.model_config(name)
    assert config.hidden_size % config.num_attention_heads == 0
    assert _param_count(config) == pytest.approx(PAPER_SIZES[name], rel=0.08)


def test_tiny_model_builds_and_counts(tiny_llama):
    assert type(tiny_llama).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in tiny_llama.parameters()) == _param_count(tiny_llama.config)
    assert tiny_llama.config.vocab_size == 256


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-60m"):
        relora.model_config("llama-7b-typo")
