"""Command-line flags and config files for every `subspace` command, from the config dataclasses.

`LabArgumentParser` is `transformers.HfArgumentParser` (flags from a dataclass's fields: type,
`help` and `aliases` metadata, `--flag`/`--no-flag` for booleans, choices for `Literal`s) with the
lab's habits added:
- sections: a field whose type is a dataclass (`TrainConfig.data`, `.optim`) contributes its
  fields as flags of their own (leaf names are unique, so the flags stay `--lr`, `--seq-len`);
- `--config FILE`: a YAML or JSON file of field values (flat, or in sections as a run's
  `config.json`); flags given on the command line override it;
- `base`: the config a command starts from (`compare`'s defaults differ from `pretrain`'s), shown
  in `--help`;
- a bad flag or value raises `UsageError` (a `ValueError`), which the CLI prints as one line with
  exit code 2, and which the Trainer hookup's `optim_args` parsing passes on to the caller.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from copy import copy
from pathlib import Path
from typing import Any, get_type_hints

from transformers import HfArgumentParser

CONFIG_FLAG = "--config"


class UsageError(ValueError):
    """A flag or value the parser does not accept; `prog` names the command."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: the help says it
        return action.help if action.default is None else super()._get_help_string(action)


class LabArgumentParser(HfArgumentParser):
    def __init__(self, dataclass_types=None, base: Any = None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --lr must not be read as --lrs, nor the reverse
        super().__init__(dataclass_types, **kwargs)
        if self.dataclass_types:
            self.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                              help="YAML or JSON file of settings (flat names as the flags', or "
                                   "sections as a run's config.json); flags override it")
        for dtype in self.dataclass_types:
            self.set_defaults(**leaf_values(base if isinstance(base, dtype) else dtype()))

    # ---- flags from fields ----------------------------------------------------------------
    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if dataclasses.is_dataclass(field.type):  # a section: its fields become flags themselves
            hints = get_type_hints(field.type)
            for sub in dataclasses.fields(field.type):
                sub = copy(sub)
                sub.type = hints[sub.name]
                LabArgumentParser._parse_dataclass_field(parser, sub)
            return
        field = copy(field)
        meta = dict(field.metadata)
        meta["help"] = meta.get("help", "").replace("%", "%%")
        plain = [t for t in getattr(field.type, "__args__", (field.type,)) if t is not type(None)]
        if plain[0] in (int, float, str):  # INT, not the field's name in capitals
            meta.setdefault("metavar", plain[0].__name__.upper())
        elif plain[0] is bool and field.default is not True:  # True adds a --no- flag instead
            meta.setdefault("metavar", "BOOL")
        field.metadata = meta
        HfArgumentParser._parse_dataclass_field(parser, field)

    # ---- parsing --------------------------------------------------------------------------
    def error(self, message: str):
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):
        """As argparse, after applying `--config FILE` as defaults; the namespace's `given_keys`
        holds the fields set by the file or a flag (not a default)."""
        args = list(args) if args is not None else None
        given: set[str] = set()
        config_file = _config_file(args or [])
        if config_file and self.dataclass_types:
            try:
                values = read_config_file(config_file, self)
            except ValueError as e:  # a missing file or a bad value is a usage error, as a flag's
                raise UsageError(self.prog, str(e)) from None
            self.set_defaults(**values)
            given |= set(values)
        unset = object()
        dests = {a.dest for a in self._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
        ns = namespace if namespace is not None else argparse.Namespace()
        for d in dests - set(vars(ns)):
            setattr(ns, d, unset)  # argparse leaves these alone unless a flag sets them
        ns, rest = super().parse_known_args(args, ns)
        for d in dests:
            if getattr(ns, d, None) is unset:
                setattr(ns, d, self.get_default(d))
            else:
                given.add(d)
        ns.given_keys = given | set(getattr(ns, "given_keys", ()))
        return ns, rest

    def parse_into(self, dtype, args: list[str]):
        """One instance of `dtype` from command-line strings (no other flags allowed)."""
        ns = self.parse_args(args)
        return build(dtype, vars(ns))

    def hide(self, *dests: str) -> None:
        """Leave fields out of `--help` (a command that sets them itself, e.g. compare's seeds)."""
        for action in self._actions:
            if action.dest in dests:
                action.help = argparse.SUPPRESS


def leaf_values(obj) -> dict[str, Any]:
    """Field name -> value of a config instance, sections flattened."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(leaf_values(v) if dataclasses.is_dataclass(v) else {f.name: copy(v)})
    return out


def build(dtype, values: dict[str, Any]):
    """An instance of `dtype` from flat leaf values (sections rebuilt); other keys are ignored."""
    kwargs = {}
    for f in dataclasses.fields(dtype):
        if dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = build(f.default_factory, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return dtype(**kwargs)


def train_config(ns: argparse.Namespace):
    """The `TrainConfig` of a parsed `pretrain`/`compare` command line, validated. A token budget
    given without `--steps` replaces the starting config's step count."""
    from .config import TrainConfig

    cfg = build(TrainConfig, vars(ns))
    given = getattr(ns, "given_keys", set())
    if "tokens" in given and "steps" not in given:
        cfg.steps = None
    return cfg.validate()


def _config_file(args: list[str]) -> str | None:
    found = None
    for i, a in enumerate(args):
        if a == CONFIG_FLAG and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(CONFIG_FLAG + "="):
            found = a.split("=", 1)[1]
    return found


def read_config_file(path: str, parser: LabArgumentParser) -> dict[str, Any]:
    """Leaf name -> value from a YAML/JSON file, each value checked and converted as its flag's
    (so YAML's `lr: 1e-3`, a string to YAML, is the float it means)."""
    from .config import flatten

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{CONFIG_FLAG} {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except ValueError as e:  # json and yaml errors both are ValueErrors
        raise ValueError(f"{CONFIG_FLAG} {path}: not valid {p.suffix[1:] or 'YAML'}: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of settings, got "
                         f"{type(data).__name__}")
    actions = {a.dest: a for a in parser._actions}
    (dtype,) = parser.dataclass_types
    flat = flatten(data, dtype, where=f"{CONFIG_FLAG} {path}")
    return {k: _convert(actions[k], v, path) for k, v in flat.items()}


def _convert(action: argparse.Action, value, path: str):
    if value is None or action.type is None:
        return value
    try:
        if action.nargs == "+":
            items = value if isinstance(value, list) else [value]
            return [action.type(str(v)) for v in items]
        out = action.type(value if isinstance(value, bool) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{CONFIG_FLAG} {path}: {action.dest}: cannot read {value!r} as "
                         f"{getattr(action.type, '__name__', 'its type')}") from None
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"{CONFIG_FLAG} {path}: {action.dest} must be one of "
                         f"{', '.join(map(str, action.choices))}, got {value!r}")
    return out
