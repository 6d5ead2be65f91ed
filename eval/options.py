"""Command-line options from a config dataclass, so each option is typed once (TRL style).

Every field becomes ``--kebab-case`` with its type, default and ``metadata["help"]``; other
metadata keys (``choices``, ``metavar``) go to ``add_argument`` as they are. Types:

- ``int``, ``float``, ``str``, ``Path``: the value's type; ``X | None`` defaults to None;
- ``bool`` (or ``bool | None``) defaulting to False/None: ``store_true``; defaulting to True:
  ``--name/--no-name``;
- ``Literal[...]``: its values as choices;
- ``list[X]``: one or more values (``nargs="+"``); ``tuple[X, ...]`` the same, ``tuple[X, X, X]``
  exactly that many; ``config_from_args`` turns the list back into a tuple;
- a field without a default is a required option (or a positional argument, when named in
  ``positional``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union


def _optional(tp: Any) -> tuple[Any, bool]:
    """(``X``, True) for ``X | None``; (tp, False) otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only X | None unions are supported, not {tp}")
        return args[0], True
    return tp, False


def _is_tuple(tp: Any) -> bool:
    tp, _ = _optional(tp)
    return tp is tuple or typing.get_origin(tp) is tuple


def _value_kwargs(tp: Any) -> dict[str, Any]:
    """``type`` (and ``choices``) for one value of type ``tp``."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if tp is Any:
        return {}
    return {"type": tp}


def argument_kwargs(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """``add_argument`` keywords for one field of resolved type ``tp`` (no option strings)."""
    tp, optional = _optional(tp)
    origin = typing.get_origin(tp)
    kw: dict[str, Any] = {}
    if f.default is not dataclasses.MISSING:
        kw["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kw["default"] = f.default_factory()
    else:
        kw["required"] = True
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction if kw.get("default") is True else "store_true"
    elif tp in (list, tuple) or origin in (list, tuple):
        items = typing.get_args(tp)
        if origin is tuple and items and items[-1] is not Ellipsis:
            if len(set(items)) != 1:
                raise TypeError(f"{f.name}: only tuples of one item type are supported, not {tp}")
            kw["nargs"] = len(items)
        else:
            kw["nargs"] = "+"
        kw.update(_value_kwargs(items[0] if items else str))
    else:
        kw.update(_value_kwargs(tp))
    help_text = f.metadata.get("help")
    if help_text is not None:
        kw["help"] = help_text.replace("%", "%%")  # argparse formats help with %
    kw.update({k: v for k, v in f.metadata.items() if k != "help"})
    return kw


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, positional: Sequence[str] = (),
                         skip: Sequence[str] = (), flags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One argument per field of the dataclass ``cls`` (in field order), its dest the field name.
    ``positional``: fields taken as positional arguments; ``skip``: fields left out (the caller
    passes them to ``config_from_args``); ``flags``: per-field ``add_argument`` overrides, where the
    key ``"flags"`` replaces the option strings, e.g. ``{"progress": {"flags": ["--quiet"],
    "action": "store_false"}}``."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(positional) | set(skip) | set(flags)) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw = argument_kwargs(f, hints[f.name])
        override = dict(flags.get(f.name, {}))
        option_strings = list(override.pop("flags", [f"--{f.name.replace('_', '-')}"]))
        kw.update(override)
        if f.name in positional:
            kw.pop("required", None)
            if "default" in kw:
                kw.setdefault("nargs", "?")
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument(*option_strings, dest=f.name, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` from the parsed ``args`` (every field the namespace has), ``extra`` taking precedence."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = set(extra) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name in names:
        if name in extra:
            values[name] = extra[name]
        elif hasattr(args, name):
            value = getattr(args, name)
            values[name] = tuple(value) if isinstance(value, list) and _is_tuple(hints[name]) else value
    return cls(**values)


def config_to_argv(cfg: Any, flags: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The options that ``add_config_arguments(parser, type(cfg), flags=flags)`` parses back into ``cfg``
    (fields at their default are left out): how a command hands its settings on to launched processes."""
    flags = flags or {}
    hints = typing.get_type_hints(type(cfg))
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kw = {**argument_kwargs(f, hints[f.name]), **flags.get(f.name, {})}
        option = list(kw.get("flags", [f"--{f.name.replace('_', '-')}"]))[0]
        if not kw.get("required") and value == kw.get("default"):
            continue
        action = kw.get("action")
        if action == "store_true" or action == "store_false":
            if bool(value) != (action == "store_true"):
                raise ValueError(f"{f.name}={value!r} cannot be written as {option}")
            argv.append(option)
        elif action is argparse.BooleanOptionalAction:
            argv.append(option if value else f"--no-{option[2:]}")
        elif value is None:
            raise ValueError(f"{f.name}=None cannot be written as an option (its default is {kw.get('default')!r})")
        elif "nargs" in kw:
            argv += [option, *(str(v) for v in value)]
        else:
            argv += [option, str(value)]
    return argv
