"""Training data: tokenize, split, pack into fixed-length sequences, and serve them in a seeded,
resumable order.

- Split: by document hash (`corpus.is_validation`), so it never depends on order or on how many
  documents were read.
- Packing: documents are joined with the tokenizer's eos token and cut into `seq_len` windows;
  the last partial window is dropped.
- Order (in-memory sources): epoch `e` visits the sequences in `randperm(N, seed=(seed, e))`.
  Every optimizer step consumes one *global* batch of `batch_size * world_size` sequences; rank r
  takes the r-th slice, so ranks see disjoint shards and the cursor is the same on every rank.
- Streaming sources (hub datasets): sequences come in stream order (hub corpora such as C4 are
  pre-shuffled); the cursor holds the stream's own position (`streaming.py`: the dataset's
  `state_dict()` and the packer's leftover tokens), so a resume continues without re-reading.
The cursor is a dict of plain values: `state_dict()` / `load_state_dict()`. `fingerprint()` hashes what
the cursor indexes into (the packed token rows and the tokenizer); a checkpoint stores it and a
resume refuses data that changed since.
"""
from __future__ import annotations

import hashlib

import torch

from .config import DataConfig
from .corpus import Source, corpus_id, is_validation, iter_documents, resolve_source
from .streaming import PackedStream
from .tokenizer import Tokenizer, load_tokenizer

_BPE_TRAIN_DOCS = 20_000  # a streamed corpus trains its BPE on its first documents


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by eos) and cut into (N, seq_len) int64 rows."""
    flat = [t for ids in token_lists for t in (*ids, eos_id)]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


class InMemoryData:
    """Packed train/validation sequences of a corpus that fits in memory."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, tokenizer: Tokenizer, seed: int):
        self.train, self.val, self.tokenizer, self.seed = train, val, tokenizer, seed
        self.cursor = {"epoch": 0, "pos": 0}
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.train), generator=g), epoch
        return self._perm

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        need = batch_size * world_size
        if need > len(self.train):
            raise ValueError(f"a global batch needs {need} sequences but the training split has "
                             f"only {len(self.train)}; lower --batch-size or --seq-len")
        if self.cursor["pos"] + need > len(self.train):
            self.cursor = {"epoch": self.cursor["epoch"] + 1, "pos": 0}
        start = self.cursor["pos"] + rank * batch_size
        idx = self._permutation(self.cursor["epoch"])[start: start + batch_size]
        self.cursor = {**self.cursor, "pos": self.cursor["pos"] + need}
        return self.train[idx]

    def val_batches(self, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1):
        """The fixed validation set (first `n_batches * batch_size` sequences), rank-sharded."""
        rows = self.val[: n_batches * batch_size]
        mine = rows[rank::world_size]
        return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]

    def state_dict(self) -> dict:
        return dict(self.cursor)

    def fingerprint(self) -> dict:
        """What a resume must find unchanged: the tokenizer and the packed rows (hashes, counts)."""
        return {"tokenizer": self.tokenizer.fingerprint, "vocab_size": self.tokenizer.vocab_size,
                "train_sequences": len(self.train), "train_sha256": _digest(self.train),
                "val_sequences": len(self.val), "val_sha256": _digest(self.val)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = {"epoch": int(state["epoch"]), "pos": int(state["pos"])}


class StreamingData(InMemoryData):
    """Sequences from a streamed dataset; validation is materialised once (it is small)."""

    def __init__(self, cfg: DataConfig, source: Source, tokenizer: Tokenizer, seed: int,
                 val: torch.Tensor, corpus: str = ""):
        super().__init__(torch.empty(0, cfg.seq_len, dtype=torch.long), val, tokenizer, seed)
        self.cfg, self.source, self.corpus = cfg, source, corpus
        self.cursor = {"epoch": 0, "pos": 0}
        self._stream: PackedStream | None = None
        self._stream_state: dict | None = None  # where a loaded cursor left the stream

    def _open(self) -> PackedStream:
        stream = PackedStream(self.cfg, self.source, self.tokenizer, self._stream_state)
        if self._stream_state is None:  # a cursor saved before streams kept their state
            for _ in range(self.cursor["pos"]):
                stream.next_row()
        return stream

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if self._stream is None:
            self._stream = self._open()
        rows = []
        for _ in range(batch_size * world_size):
            row = self._stream.next_row()
            if row is None:  # end of the stream: the next epoch replays it in the same order
                self.cursor = {"epoch": self.cursor["epoch"] + 1, "pos": 0}
                self._stream = PackedStream(self.cfg, self.source, self.tokenizer)
                row = self._stream.next_row()
                if row is None:
                    raise ValueError(f"dataset {self.cfg.source!r} yields no training sequences")
            rows.append(row)
            self.cursor["pos"] += 1
        return torch.stack(rows[rank * batch_size: (rank + 1) * batch_size])

    def state_dict(self) -> dict:
        stream = self._stream.state_dict() if self._stream is not None else self._stream_state
        return {**self.cursor, "stream": stream}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._stream, self._stream_state = None, state.get("stream")

    def fingerprint(self) -> dict:
        """The training rows are never materialised: the corpus id (files' size and mtime, or the
        hub name) stands for them."""
        return {**super().fingerprint(), "corpus": self.corpus}


def _digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()[:16]


def build_data(cfg: DataConfig, seed: int, val_sequences: int = 64) -> InMemoryData | StreamingData:
    """Resolve the source, get the tokenizer, split and pack. Clear errors for bad input."""
    source = resolve_source(cfg)
    cid = corpus_id(cfg, source)
    if not source.streaming:
        docs = list(iter_documents(cfg, source))
        if not docs:
            raise ValueError(f"corpus {cfg.source!r} is empty (no non-blank documents)")
        tok = load_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size, corpus_id=cid,
                             corpus_texts=lambda: docs, cache_dir=cfg.cache_dir)
        flags = [is_validation(d, cfg.val_fraction) for d in docs]
        if cfg.val_fraction > 0 and not any(flags) and len(docs) > 1:
            flags[-1] = True  # tiny corpora: never leave validation empty by bad luck
        train_docs = [d for d, v in zip(docs, flags) if not v]
        val_docs = [d for d, v in zip(docs, flags) if v]
        train_ids, val_ids = tok.encode_batch(train_docs), tok.encode_batch(val_docs)
        train = pack(train_ids, tok.eos_id, cfg.seq_len)
        val = pack(val_ids, tok.eos_id, cfg.seq_len)
        if len(train) == 0 or (cfg.val_fraction > 0 and len(val) == 0):
            raise ValueError(_too_small(cfg, source, len(train) == 0, train_ids, val_ids))
        return InMemoryData(train, val, tok, seed)

    tok = load_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size, corpus_id=cid,
                         corpus_texts=lambda: _first(iter_documents(cfg, source), _BPE_TRAIN_DOCS),
                         cache_dir=cfg.cache_dir)
    val_rows = PackedStream(cfg, source, tok, validation=True)
    rows = [] if cfg.val_fraction <= 0 else \
        _first(iter(val_rows.next_row, None), val_sequences)
    val = torch.stack(rows) if rows else torch.empty(0, cfg.seq_len, dtype=torch.long)
    return StreamingData(cfg, source, tok, seed, val, cid)


def _too_small(cfg: DataConfig, source, train_short: bool, train_ids, val_ids) -> str:
    """Which split is too short, with the document and token counts behind it."""
    n_docs = len(train_ids) + len(val_ids)
    ids = train_ids if train_short else val_ids
    tokens = sum(len(i) + 1 for i in ids)
    split = "training" if train_short else "validation"
    msg = (f"the {split} split of {cfg.source!r} is too small: {n_docs} document(s) read, "
           f"{len(ids)} of them in {split} with {tokens} tokens, fewer than one sequence of "
           f"--seq-len {cfg.seq_len}")
    if n_docs == 1 and source.builder == "text":
        msg += ("; a text file is split into documents at blank lines, and this one has none, "
                "so it is one document (put a blank line between documents, or use .jsonl)")
    elif n_docs == 1:
        msg += "; one document cannot be split into training and validation: add documents"
    elif train_short:
        msg += "; lower --seq-len or add text"
    else:
        msg += (f"; documents go to validation by hash with probability --val-fraction "
                f"{cfg.val_fraction}: raise it, add documents, or lower --seq-len")
    return msg


def _first(it, n: int) -> list:
    out = []
    for x in it:
        if len(out) >= n:
            break
        out.append(x)
    return out
