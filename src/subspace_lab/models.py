"""LLaMA-style causal language models, from CPU-sized to the GaLore paper's shapes.

The 60m-7b entries are the shapes of the GaLore paper (Zhao et al., "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection", arXiv:2403.03507, Table 9 / their configs/llama_*.json);
`micro` is for unit tests, `tiny` and `small` are CPU sizes for the default comparison. The vocabulary always comes
from the tokenizer. Init is seeded by a private generator scope, so two builds with the same seed
are bitwise equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    max_positions: int = 1024


MODEL_SHAPES: dict[str, LlamaShape] = {
    "micro": LlamaShape(32, 88, 2, 2, 256),      # ~60k params at vocab 512: unit tests only
    "tiny": LlamaShape(128, 352, 4, 4, 512),     # ~1.9M params at vocab 4096 (1.05M embeddings)
    "small": LlamaShape(256, 688, 4, 4, 1024),   # ~5.3M params at vocab 4096
    "60m": LlamaShape(512, 1376, 8, 8),
    "130m": LlamaShape(768, 2048, 12, 12),
    "350m": LlamaShape(1024, 2736, 16, 24),
    "1b": LlamaShape(2048, 5461, 32, 24),        # GaLore configs/llama_1b.json: 32 heads, 24 layers
    "7b": LlamaShape(4096, 11008, 32, 32),
}


def llama_config(name: str, vocab_size: int, max_seq_len: int | None = None):
    """A `transformers.LlamaConfig` for a named size. Unknown names raise ValueError."""
    from transformers import LlamaConfig

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_SHAPES)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    s = MODEL_SHAPES[name]
    max_pos = max(s.max_positions, max_seq_len or 0)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, num_hidden_layers=s.layers,
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, tie_word_embeddings=False,
        initializer_range=0.02, use_cache=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


def build_model(name: str, vocab_size: int, seed: int = 0, max_seq_len: int | None = None):
    """Build a freshly initialised `LlamaForCausalLM`; same (name, vocab, seed) -> same weights.

    The global RNG is saved and restored around the init so building a model does not perturb
    anything else that draws from it.
    """
    from transformers import LlamaForCausalLM

    cfg = llama_config(name, vocab_size, max_seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def check_seq_len(model, seq_len: int) -> None:
    limit = model.config.max_position_embeddings
    if seq_len > limit:
        raise ValueError(f"sequence length {seq_len} exceeds the model's max_position_embeddings "
                         f"{limit}; use a shorter --seq-len or a larger model config")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_nll(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over the batch (fp32) and the number of predicted tokens.

    Perplexity is exp(sum / count) over all evaluated tokens: token-weighted, never a mean of
    per-batch perplexities.
    """
    check_seq_len(getattr(model, "module", model), input_ids.shape[1])
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll, targets.numel()
