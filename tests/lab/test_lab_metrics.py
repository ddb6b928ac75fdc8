"""Run-directory JSON lines after a crash: a torn last line (a kill mid-write) is dropped on
resume; any other unreadable line is an error naming the file and the line."""
import pytest

from lab_helpers import lab_cache, make_cfg, read_jsonl  # noqa: F401
from subspace_lab.metrics import read_jsonl as lab_read_jsonl
from subspace_lab.train import train

TORN = '{"event": "train", "step": 5, "loss": 6.1, "lr": 0.0'  # cut mid-record: no newline


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_time_s", "peak_memory_mb")}
            for r in records]


def test_torn_last_lines_are_dropped_on_resume(tmp_path, lab_cache):
    kw = dict(steps=8, optim__method="galore", eval_every=4)
    full = train(make_cfg(tmp_path / "full", lab_cache, **kw))
    train(make_cfg(tmp_path / "cut", lab_cache, stop_at=4, **kw))
    for name in ("metrics.jsonl", "overlap.jsonl"):  # the kill came while writing step 5
        with open(tmp_path / "cut" / name, "a") as f:
            f.write(TORN)
    rest = train(make_cfg(tmp_path / "cut", lab_cache, resume=True, **kw))
    assert rest.losses == full.losses[4:]
    assert _strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == \
        _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert read_jsonl(tmp_path / "cut" / "overlap.jsonl") == \
        read_jsonl(tmp_path / "full" / "overlap.jsonl")


def test_corrupt_line_inside_is_named(tmp_path, lab_cache):
    kw = dict(steps=6, eval_every=0)
    train(make_cfg(tmp_path / "r", lab_cache, stop_at=3, **kw))
    path = tmp_path / "r" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # damaged in the middle: not what a crash leaves
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        train(make_cfg(tmp_path / "r", lab_cache, resume=True, **kw))


def test_reader_keeps_a_complete_last_record_without_newline(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')  # the record is whole; only "\n" is missing
    assert lab_read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2')
    assert lab_read_jsonl(path) == [{"step": 1}]
