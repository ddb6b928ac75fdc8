"""Bad input to `subspace pretrain`/`compare`/`finetune`: one clear line on stderr, exit code 2, no
traceback, nothing lost; names are checked before any data is built."""
import errno
import os
import re
import stat

import pytest
import torch

import subspace_lab.compare as C
import subspace_lab.train as T
from lab_helpers import lab_cache  # noqa: F401
from subspace_lab import checkpoint as ckpt
from subspace_lab.cli import main


def _args(lab_cache, out, *extra) -> list[str]:
    return ["pretrain", "--model", "micro", "--max-docs", "40", "--vocab-size", "512",
            "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--eval-every", "0",
            "--steps", "2", "--cache-dir", str(lab_cache), "--no-progress", "--out-dir", str(out),
            *extra]


def _fails(argv, capsys) -> str:
    """Run the CLI; it must fail with exit code 2 and exactly one line on stderr."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and "examples/s" not in l]  # datasets' bar
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", b"", r"empty\.txt is empty"),
    ("latin1.txt", "caf\u00e9 au lait\n\nmore text\n".encode("latin-1"),
     r"latin1\.txt: not UTF-8 text \(byte 0xe9 on line 1\)"),
    ("binary.txt", bytes(range(256)) * 20, r"binary\.txt: it looks binary"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "torn\n', r"bad\.jsonl: line 2 is not valid JSON"),
])
def test_unreadable_data_files(tmp_path, lab_cache, capsys, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    line = _fails(_args(lab_cache, tmp_path / "out", "--data", str(tmp_path / name)), capsys)
    assert line.startswith("subspace pretrain: error: ")
    assert re.search(pattern, line), line


def test_out_dir_that_is_a_file(tmp_path, lab_cache, capsys):
    (tmp_path / "f").write_text("keep me")
    line = _fails(_args(lab_cache, tmp_path / "f"), capsys)
    assert "--out-dir" in line and "is not a directory" in line
    assert (tmp_path / "f").read_text() == "keep me"
    line = _fails(_args(lab_cache, tmp_path / "f" / "run"), capsys)
    assert "a parent of it is a file" in line


def test_read_only_out_dir(tmp_path, lab_cache, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(ro, os.W_OK):  # root ignores permissions: make creating files there fail alike
        real_open = open

        def deny(path, *a, **k):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr("builtins.open", deny)
    try:
        line = _fails(_args(lab_cache, ro), capsys)
    finally:
        ro.chmod(stat.S_IRWXU)
    assert "--out-dir" in line and "is not writable: Permission denied" in line


def test_cuda_without_cuda(tmp_path, lab_cache, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _fails(_args(lab_cache, tmp_path / "o", "--device", "cuda"), capsys)
    assert "--device cuda: no CUDA device is available" in line


def test_disk_full_during_checkpoint(tmp_path, lab_cache, capsys, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.f.flush()

    def save(obj, f, *a, **k):  # the first checkpoint (4 files) fits, the second does not
        calls["n"] += 1
        return real_save(obj, f if calls["n"] <= 4 else FullDisk(f), *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "full"
    argv = _args(lab_cache, out, "--steps", "4", "--checkpoint-every", "2")
    line = _fails(argv, capsys)
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "step-000002 is intact" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert ckpt.load_checkpoint(out / "checkpoints" / "step-000002")["trainer"]["step"] == 2


def test_corrupt_cached_tokenizer_names_its_path(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_args(cache, tmp_path / "a")) == 0
    (cached,) = (cache / "tokenizers").glob("bpe-512-*.json")
    cached.write_text(cached.read_text()[:100])
    line = _fails(_args(cache, tmp_path / "b"), capsys)
    assert f"cached tokenizer {cached} is unreadable" in line and "delete it" in line


@pytest.mark.parametrize("flag,value,pattern", [
    ("--vocab-size", "1", "data.vocab_size (--vocab-size) must be >= 257"),
    ("--max-docs", "-1", "data.max_docs (--max-docs) must be >= 1, got -1"),
    ("--seq-len", "1", "data.seq_len (--seq-len) must be >= 2"),
])
def test_out_of_range_values(tmp_path, lab_cache, capsys, flag, value, pattern):
    assert pattern in _fails(_args(lab_cache, tmp_path / "o", flag, value), capsys)


def test_one_document_per_line_text_file(tmp_path, lab_cache, capsys):
    lines = [f"line {i} of a file with one short document on every line" for i in range(200)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    line = _fails(_args(lab_cache, tmp_path / "o", "--data", str(tmp_path / "lines.txt")), capsys)
    assert "1 document(s) read" in line
    assert "split into documents at blank lines, and this one has none" in line


def test_names_are_checked_before_any_data_is_built(tmp_path, lab_cache, capsys, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("data was built before the optimizer name was checked")
    monkeypatch.setattr(T, "build_data", no_data)
    monkeypatch.setattr(C, "build_data", no_data)
    line = _fails(_args(lab_cache, tmp_path / "o", "--optimizer", "nope"), capsys)
    assert "unknown optimizer 'nope'; allowed: adamw, galore, i3s" in line
    for flags in (["--optimizers", "adamw,nope"], ["--model", "huge"],
                  ["--lrs", "galore=1e-2", "--optimizers", "adamw"]):
        argv = ["compare", "--steps", "2", "--cache-dir", str(lab_cache), "--no-progress",
                "--out-dir", str(tmp_path / "c"), *flags]
        assert "error" in _fails(argv, capsys)
    assert not (tmp_path / "c" / "command.txt").exists()


def test_optimizer_help_lists_the_names(capsys):
    from subspace_lab.optimizers import METHODS
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method STR, --optimizer STR optimizer: " + ", ".join(METHODS) in text


@pytest.mark.parametrize("command", ["pretrain", "finetune", "compare"])
@pytest.mark.parametrize("name,text,pattern", [
    (None, None, r"--config \S+missing\.yaml: no such file"),
    ("bad.json", '{"lr": "abc"}', r"--config \S+bad\.json: lr: cannot read 'abc' as float"),
    ("bad.yaml", "nonfinite: ignore\n", r"nonfinite must be one of"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, capsys, command, name, text, pattern):
    path = tmp_path / (name or "missing.yaml")
    if text is not None:
        path.write_text(text)
    line = _fails([command, "--config", str(path)], capsys)
    assert line.startswith(f"subspace {command}: error: --config "), line
    assert re.search(pattern, line), line
