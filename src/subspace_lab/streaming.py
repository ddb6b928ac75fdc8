"""Packed token rows from a streamed dataset, resumable from the dataset's own state.

The training documents of a streamed corpus (a `datasets.IterableDataset`; blank documents,
those past `max_docs` and the validation ones dropped) are tokenized `ENCODE_CHUNK` at a time,
each followed by eos, into a token buffer that is cut into `seq_len` rows. The position in the
stream is three things: the dataset's `state_dict()` taken after the last document that went
into the buffer, the tokens still in the buffer, and the number of documents read (for
`max_docs`). `PackedStream(..., state)` continues from them: `datasets` re-reads at most the
record batch the position is in, and nothing before it is read or tokenized again.
"""
from __future__ import annotations

import torch

from .config import DataConfig
from .corpus import Source, dataset_texts, is_validation, open_dataset
from .tokenizer import Tokenizer

ENCODE_CHUNK = 256  # documents tokenized per call (the fast tokenizers work in batches)


class PackedStream:
    def __init__(self, cfg: DataConfig, source: Source, tokenizer: Tokenizer,
                 state: dict | None = None, validation: bool = False):
        self.cfg, self.tokenizer, self.validation = cfg, tokenizer, validation
        self.dataset = open_dataset(cfg, source)
        state = state or {}
        if state.get("dataset") is not None:
            self.dataset.load_state_dict(state["dataset"])
        self.dataset_state = state.get("dataset")
        self.docs = int(state.get("docs", 0))
        self.buffer: list[int] = state["buffer"].tolist() if "buffer" in state else []
        self.texts = dataset_texts(self.dataset, cfg, source)

    def next_row(self) -> torch.Tensor | None:
        """The next (seq_len,) row, or None at the end of the stream."""
        n = self.cfg.seq_len
        while len(self.buffer) < n:
            if not self._read_chunk():
                return None
        row = torch.tensor(self.buffer[:n], dtype=torch.long)
        del self.buffer[:n]
        return row

    def _read_chunk(self) -> bool:
        chunk = []
        for text in self.texts:
            if self.cfg.max_docs is not None and self.docs >= self.cfg.max_docs:
                break
            if not text or not text.strip():
                continue
            self.docs += 1
            if is_validation(text, self.cfg.val_fraction) == self.validation:
                chunk.append(text)
                if len(chunk) >= ENCODE_CHUNK:
                    break
        if not chunk:
            return False
        for ids in self.tokenizer.encode_batch(chunk):
            self.buffer.extend(ids)
            self.buffer.append(self.tokenizer.eos_id)
        self.dataset_state = self.dataset.state_dict()
        return True

    def state_dict(self) -> dict:
        """Plain values and one int64 tensor: loads with `torch.load(weights_only=True)`."""
        return {"dataset": self.dataset_state, "docs": self.docs,
                "buffer": torch.tensor(self.buffer, dtype=torch.long)}
