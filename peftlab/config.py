"""Config dictionaries (a run's config.json, an experiment file) into the dataclasses they describe.

Values are checked against the fields' types, so that a wrong one fails here with its name and not
deep inside training. Keys this peftlab does not know (a config from a newer version) are warned
about and ignored: the run still loads.
"""

import dataclasses
import numbers
import os
import types
import typing
import warnings

from peftlab.errors import PeftlabError, did_you_mean


def _accepts(tp, value) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int to Python, never to a config
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    if tp in (int, str):
        return isinstance(value, tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return True


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _describe(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else "a mapping" if dataclasses.is_dataclass(tp) else tp.__name__


def check_fields(obj) -> None:
    """A dataclass built in Python (not from a file) holds values of its fields' types: a wrong one
    fails here, named, not later inside training (`TrainArgs(epochs="2")`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, tp = getattr(obj, f.name), hints[f.name]
        if not f.init or _accepts(tp, v):
            continue
        if isinstance(v, os.PathLike) and _accepts(tp, ""):
            v = os.fspath(v)  # out=Path("runs/x")
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):  # numpy numbers; 16.0 for 16
            if _accepts(tp, 0.5):
                v = float(v)
            elif _accepts(tp, 0) and float(v).is_integer():
                v = int(v)
        if not _accepts(tp, v):
            raise PeftlabError(f"{type(obj).__name__}: '{f.name}' must be {_describe(tp)}, got {v!r}")
        setattr(obj, f.name, v)  # the plain Python value, so that config.json stays loadable


def build(cls, values: dict, where: str, *, unknown: str = "warn"):
    """An instance of dataclass `cls` from `values` (nested dataclasses from nested dicts).

    unknown: 'warn' (ignore keys `cls` lacks, with a warning) or 'error'.
    Raises PeftlabError naming `where` and the key for a value of the wrong type.
    """
    if not isinstance(values, dict):
        raise PeftlabError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    extra = sorted(str(k) for k in values if k not in names)
    if extra and unknown == "error":
        hint = did_you_mean(extra[0], names)
        raise PeftlabError(f"{where}: unknown setting(s) {extra}; {hint + ' ' if hint else ''}valid: {', '.join(names)}")
    if extra:
        warnings.warn(f"{where}: ignoring setting(s) this peftlab does not know: {', '.join(extra)} "
                      "(written by a newer version?)")
    kw = {}
    for name in names:
        if name not in values:
            continue
        v, tp = values[name], hints[name]
        if isinstance(v, str) and _accepts(tp, 1.0) and not _accepts(tp, v):
            v = _number(v)  # YAML reads 1e-3 (no dot) as text, where a user meant the number
        if isinstance(v, bool) and not _accepts(tp, v) and _accepts(tp, "on" if v else "off") \
                and not _accepts(tp, "any text"):
            v = "on" if v else "off"  # and `off` as false, where a setting takes the word
        if not _accepts(tp, v):
            raise PeftlabError(f"{where}: '{name}' must be {_describe(tp)}, got {v!r}")
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = build(tp, v, f"{where} {name}", unknown=unknown)
        kw[name] = float(v) if tp is float and isinstance(v, int) else v
    return cls(**kw)
