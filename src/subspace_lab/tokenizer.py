"""Tokenizers for the lab: a byte-level BPE trained (and cached) on the corpus, or any Hugging Face
tokenizer by name or path.

Both are wrapped in `Tokenizer`, which exposes only what the data pipeline needs: `encode_batch`,
`vocab_size` and `eos_id` (appended after every document so packing never glues two documents
together silently), and `fingerprint`, a hash of the tokenizer's full definition that a
checkpoint stores so a resume can refuse a retrained or different tokenizer.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

EOS = "<|endoftext|>"


def default_cache_dir(cache_dir: str | None = None) -> Path:
    d = cache_dir or os.environ.get("SUBSPACE_CACHE") or Path.home() / ".cache" / "subspace-optim"
    return Path(d)


class Tokenizer:
    def __init__(self, encode: Callable[[list[str]], list[list[int]]], vocab_size: int,
                 eos_id: int, identity: str, backend=None):
        self._encode = encode
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.identity = identity  # a stable string naming this exact tokenizer (for caches)
        self.backend = backend
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the serialised vocabulary and merges."""
        if self._fingerprint is None:
            b = self.backend
            b = getattr(b, "backend_tokenizer", b)  # transformers' fast tokenizers wrap one
            if hasattr(b, "to_str"):
                text = b.to_str()
            elif hasattr(b, "get_vocab"):
                text = repr(sorted(b.get_vocab().items()))
            else:
                text = f"{self.identity}|{self.vocab_size}|{self.eos_id}"
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a GPT-2 style byte-level BPE (every byte is in the alphabet, so nothing is <unk>)."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _wrap_bpe(tok, identity: str) -> Tokenizer:
    def encode(texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    return Tokenizer(encode, tok.get_vocab_size(), tok.token_to_id(EOS), identity, tok)


def load_tokenizer(spec: str, *, vocab_size: int, corpus_id: str,
                   corpus_texts: Callable[[], Iterable[str]], cache_dir: str | None = None
                   ) -> Tokenizer:
    """`spec == "bpe"`: load the cached BPE for (corpus_id, vocab_size) or train and cache it.
    Anything else: `transformers.AutoTokenizer.from_pretrained(spec)`.
    """
    if spec == "bpe":
        from tokenizers import Tokenizer as HFTok

        key = hashlib.sha256(f"{corpus_id}|{vocab_size}".encode()).hexdigest()[:16]
        path = default_cache_dir(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
        if path.exists():
            try:
                tok = HFTok.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise ValueError(f"cached tokenizer {path} is unreadable ({e}); delete it and it "
                                 f"is trained again") from e
        else:
            tok = train_bpe(corpus_texts(), vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tok.save(str(tmp))
            os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
        return _wrap_bpe(tok, f"bpe:{key}")

    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - re-raised with the user's input named
        raise ValueError(f"could not load tokenizer {spec!r} (a Hugging Face name or a local "
                         f"path; use 'bpe' to train one on the corpus): {e}") from e
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {spec!r} has no eos (or sep) token to separate documents")

    def encode(texts):
        return hf(texts, add_special_tokens=False)["input_ids"]
    return Tokenizer(encode, len(hf), eos, f"hf:{spec}", hf)
