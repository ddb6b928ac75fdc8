import re

import pytest
import torch

from lab_helpers import lab_cache, write_jsonl_corpus, write_text_corpus  # noqa: F401
from subspace_lab.config import DataConfig
from subspace_lab.corpus import is_validation, iter_documents, kjv_documents
from subspace_lab.data import build_data, pack


def _cfg(lab_cache, **kw) -> DataConfig:
    base = dict(source="kjv", max_docs=40, vocab_size=512, seq_len=32, cache_dir=str(lab_cache))
    return DataConfig(**{**base, **kw})


def test_kjv_corpus_is_clean():
    docs = kjv_documents()
    assert len(docs) > 1000
    assert docs[0].startswith("In the beginning God created")
    assert not any(re.search(r"(?<!\S)\d+:\d+\s", d) for d in docs[:50])


def test_pack_joins_with_eos_and_drops_tail():
    out = pack([[1, 2, 3], [4, 5]], eos_id=0, seq_len=3)
    assert out.tolist() == [[1, 2, 3], [0, 4, 5]]


def test_split_is_deterministic_and_disjoint(lab_cache):
    docs = list(iter_documents(_cfg(lab_cache, max_docs=None)))
    val = [d for d in docs if is_validation(d, 0.02)]
    assert 0 < len(val) < 0.05 * len(docs)
    assert val == [d for d in docs if is_validation(d, 0.02)]
    a, b = build_data(_cfg(lab_cache), 0), build_data(_cfg(lab_cache), 0)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    train_rows = {tuple(r) for r in a.train.tolist()}
    assert not any(tuple(r) in train_rows for r in a.val.tolist())


def test_tokenizer_is_cached(tmp_path):
    # its own cache: the session's cache may already hold other 300-token tokenizers (random order)
    cfg = _cfg(tmp_path, max_docs=12, vocab_size=300)
    a = build_data(cfg, 0)
    files = list((tmp_path / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = build_data(cfg, 0)
    assert a.tokenizer.identity == b.tokenizer.identity and files[0].stat().st_mtime_ns == mtime
    assert a.tokenizer.vocab_size == 300


def test_seeded_order_and_resumable_cursor(lab_cache):
    d = build_data(_cfg(lab_cache), seed=3)
    n = len(d.train)
    first = [d.next_batch(4) for _ in range(3)]
    saved = d.state_dict()
    rest = [d.next_batch(4) for _ in range(n // 4 + 2)]  # crosses an epoch boundary
    assert d.state_dict()["epoch"] == 1
    e = build_data(_cfg(lab_cache), seed=3)
    e.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(rest, [e.next_batch(4) for _ in rest]))
    again = build_data(_cfg(lab_cache), seed=3)
    assert all(torch.equal(x, again.next_batch(4)) for x in first)
    other = build_data(_cfg(lab_cache), seed=4)
    assert not torch.equal(first[0], other.next_batch(4))


def test_ranks_get_disjoint_shards(lab_cache):
    d0, d1 = build_data(_cfg(lab_cache), 0), build_data(_cfg(lab_cache), 0)
    b0, b1 = d0.next_batch(4, rank=0, world_size=2), d1.next_batch(4, rank=1, world_size=2)
    single = build_data(_cfg(lab_cache), 0).next_batch(8)
    assert torch.equal(torch.cat([b0, b1]), single)
    assert d0.state_dict() == d1.state_dict()


def test_local_text_and_jsonl(tmp_path, lab_cache):
    txt = write_text_corpus(tmp_path / "corpus.txt", 20)
    jsl = write_jsonl_corpus(tmp_path / "corpus.jsonl", 20, field="body")
    a = build_data(_cfg(lab_cache, source=str(txt), max_docs=None), 0)
    b = build_data(_cfg(lab_cache, source=str(jsl), max_docs=None, text_field="body"), 0)
    assert len(a.train) > 10 and len(a.val) > 0
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)  # same documents
    assert int(a.train.max()) < a.tokenizer.vocab_size


def test_streaming_path_on_local_jsonl(tmp_path, lab_cache):
    jsl = write_jsonl_corpus(tmp_path / "c.jsonl", 20)
    cfg = _cfg(lab_cache, source=str(jsl), max_docs=None, streaming=True, val_fraction=0.3)
    s = build_data(cfg, 0, val_sequences=16)
    assert s.val.shape == (16, 32)
    batches = [s.next_batch(4, rank=1, world_size=2) for _ in range(5)]
    saved_after_2 = None
    s2 = build_data(cfg, 0, val_sequences=16)
    for i in range(5):
        if i == 2:
            saved_after_2 = s2.state_dict()
        assert torch.equal(s2.next_batch(4, rank=1, world_size=2), batches[i])
    s3 = build_data(cfg, 0, val_sequences=16)
    s3.load_state_dict(saved_after_2)
    assert torch.equal(s3.next_batch(4, rank=1, world_size=2), batches[2])


def test_bad_inputs(tmp_path, lab_cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_data(_cfg(lab_cache, source=str(tmp_path / "missing.txt")), 0)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty"):
        build_data(_cfg(lab_cache, source=str(tmp_path / "empty.txt")), 0)
    jsl = write_jsonl_corpus(tmp_path / "c.jsonl", 3, field="body")
    with pytest.raises(ValueError, match="no field 'text'"):
        build_data(_cfg(lab_cache, source=str(jsl)), 0)
    (tmp_path / "short.txt").write_text("just a few words\n\nand a few more\n")
    with pytest.raises(ValueError, match="training split .* too small.*--seq-len 32"):
        build_data(_cfg(lab_cache, source=str(tmp_path / "short.txt"), vocab_size=300), 0)
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not load dataset 'no-such-org/no-such-data'"):
        build_data(_cfg(lab_cache, source="no-such-org/no-such-data", streaming=True), 0)


def test_streamed_data_resumes_from_the_datasets_own_state(tmp_path, lab_cache, monkeypatch):
    """A resumed stream continues from `IterableDataset.state_dict()` and the packer's leftover
    tokens: the same rows as an uninterrupted stream, and nothing before the position is read or
    tokenized again (across an epoch boundary too)."""
    import subspace_lab.streaming as S
    monkeypatch.setattr(S, "ENCODE_CHUNK", 3)  # several chunks in a small file
    jsl = write_jsonl_corpus(tmp_path / "c.jsonl", 8)
    cfg = _cfg(lab_cache, source=str(jsl), max_docs=None, streaming=True, val_fraction=0.1)
    whole = build_data(cfg, 0, val_sequences=4)
    rows = [whole.next_batch(8) for _ in range(40)]  # more than one pass over the file
    assert whole.state_dict()["epoch"] >= 1
    cut = build_data(cfg, 0, val_sequences=4)
    for i in range(25):
        assert torch.equal(cut.next_batch(8), rows[i])
    saved = cut.state_dict()
    assert set(saved["stream"]) == {"dataset", "docs", "buffer"}
    encoded = []
    real = cut.tokenizer.encode_batch

    def counting(texts):
        encoded.extend(texts)
        return real(texts)
    resumed = build_data(cfg, 0, val_sequences=4)
    resumed.tokenizer.encode_batch = counting
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.next_batch(8), rows[25])
    assert len(encoded) <= S.ENCODE_CHUNK  # at most one new chunk, not the stream up to here
    for i in range(26, 40):
        assert torch.equal(resumed.next_batch(8), rows[i])


def test_stream_cursor_is_a_weights_only_checkpoint_value(tmp_path, lab_cache):
    import io
    jsl = write_jsonl_corpus(tmp_path / "c.jsonl", 12)
    s = build_data(_cfg(lab_cache, source=str(jsl), max_docs=None, streaming=True), 0, 4)
    s.next_batch(2)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    assert again["pos"] == 2 and torch.equal(again["stream"]["buffer"], s.state_dict()["stream"]["buffer"])
