"""`--key=value` command lines for the config dataclasses (config.py): typed, strict, and listed by `--help`.

    parse(TrainConfig, ["--lr=1e-4", "--model.gpt.n_layer=2"])  ->  {"lr": 1e-4, "model.gpt.n_layer": 2}
    apply(cfg, values)     a copy of cfg with those values (dataclasses.replace, nested by dots)
    train_config(args)     the validated recipe: preset, then stage, then mode choose the defaults; then every other key

A key that names no field, a value of the wrong type, or an item that is not `--key=value` is a ConfigError naming it.
Keys are the field names, dotted for nested sections: `--data.seq_len=512`, `--model.gpt.n_head=10`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import replace

from ocr_vlm import config
from ocr_vlm.config import ConfigError, TrainConfig


def parse(cls: type, args: list[str]) -> dict[str, object]:
    """Each `--key=value` of `args` as {key: typed value}, in order (a later repeat wins)."""
    values = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg!r}: options are written --key=value")
        key, text = arg[2:].split("=", 1)
        values[key] = _parse(text, _field_type(cls, key), key)
    return values


def apply(cfg, values: dict[str, object]):
    """A copy of `cfg` with `values` ({dotted key: value}) set; `cfg` itself is left as it was."""
    direct, nested = {}, {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    sections = {name: apply(getattr(cfg, name), sub) for name, sub in nested.items()}
    return replace(cfg, **direct, **sections)


def with_args(cfg, args: list[str]):
    """`cfg` with the `--key=value` items applied, validated: for tools that take a model config's keys."""
    return apply(cfg, parse(type(cfg), args)).validate()


def train_config(args: list[str]) -> TrainConfig:
    """The recipe a training command line asks for. `preset`, `stage` and `mode` choose defaults (the model preset,
    the stage preset, the resolution mode), so they apply first; every other key then overrides, in order."""
    values = parse(TrainConfig, args)
    chosen = TrainConfig(**{key: values.pop(key) for key in ("preset", "stage", "mode") if key in values})
    if chosen.stage not in config.STAGES:
        raise ConfigError(f"stage: {chosen.stage} is not one of {', '.join(map(str, config.STAGES))}")
    cfg = config.STAGES[chosen.stage](replace(chosen, model=config.preset(chosen.preset)))
    if cfg.mode:
        cfg = replace(cfg, model=cfg.model.with_mode(cfg.mode))
    return apply(cfg, values).validate()


def help_text(cfg) -> str:
    """Every key of `cfg` with its value there and the one-line doc its field's comment gives."""
    rows = [(f"--{key}={show(value)}", doc) for key, value, doc in keys(cfg)]
    width = max(len(option) for option, _ in rows)
    return "\n".join(f"  {option:<{width}}  {doc}" for option, doc in rows)


def keys(cfg, prefix: str = ""):
    """(dotted key, value, doc) for every settable field of `cfg`, sections expanded."""
    docs = _field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, docs.get(f.name, "")


def _field_docs(cls: type) -> dict[str, str]:
    """The trailing comment of each field line in the class source: one place for a field's default and its doc."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        found = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if found:
            docs[found[1]] = found[2]
    return docs


def show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _field_type(cls: type, key: str):
    target = cls
    *sections, name = key.split(".")
    for part in [*sections, name]:
        hints = typing.get_type_hints(target) if dataclasses.is_dataclass(target) else {}
        if part not in hints:
            raise ConfigError(f"--{key}: unknown key for {cls.__name__}")
        target = hints[part]
    if dataclasses.is_dataclass(target):
        raise ConfigError(f"{key}: is a section; set its fields, e.g. --{key}.<field>=...")
    return target


def _parse(text: str, typ, key: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(typ) if t is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(text, options[0], key)
    if origin is tuple:
        items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
        item_type = typing.get_args(typ)[0]
        return tuple(_parse(t.strip(), item_type, key) for t in items)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {text!r}")
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {text!r}") from None
    return text
