import math

import pytest

import torch

from subspace_lab.models import MODEL_SHAPES, build_model, count_params, llama_config, lm_nll


def test_paper_shapes():
    for name, (h, inter, heads, layers) in {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12),
                                            "350m": (1024, 2736, 16, 24), "1b": (2048, 5461, 32, 24),
                                            "7b": (4096, 11008, 32, 32)}.items():
        c = llama_config(name, 32000)
        assert (c.hidden_size, c.intermediate_size, c.num_attention_heads,
                c.num_hidden_layers, c.vocab_size) == (h, inter, heads, layers, 32000)


def test_tiny_and_small_sizes():
    assert 1.5e6 < count_params(build_model("tiny", 4096)) < 2.5e6
    assert 4e6 < count_params(build_model("small", 4096)) < 7e6


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="allowed: .*tiny.*60m"):
        build_model("huge", 100)


def test_seeded_init_and_global_rng_untouched():
    before = torch.get_rng_state()
    a, b, c = build_model("micro", 100, seed=1), build_model("micro", 100, seed=1), build_model("micro", 100, seed=2)
    assert torch.equal(before, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_sequence_too_long_is_a_clear_error():
    m = build_model("micro", 100)
    x = torch.zeros(1, MODEL_SHAPES["micro"].max_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        lm_nll(m, x)


def test_initial_loss_is_about_ln_vocab():  # H7
    vocab = 512
    m = build_model("micro", vocab, seed=0)
    x = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll, n = lm_nll(m, x)
    assert n == 8 * 31
    assert abs(nll.item() / n - math.log(vocab)) < 0.1


def test_overfits_a_single_batch():  # H7
    m = build_model("micro", 64, seed=0)
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    for _ in range(80):
        nll, n = lm_nll(m, x)
        (nll / n).backward()
        opt.step()
        opt.zero_grad()
    assert (nll / n).item() < 0.5  # from ln(64) = 4.16
