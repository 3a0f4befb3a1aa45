"""Typed config schemas: dataclasses whose fields declare each key's type and the values it takes.

A schema's field annotation is the key's type (int, float, str, bool, list[...], Optional[...]);
`within(low, high)` declares the range of a number (of every number of a list) and `one_of(...)` the
choices of a word. `check_schema` types a config node by its schema with OmegaConf (which refuses a value of
another type and a key the schema does not declare), then walks the schema's fields and checks each
declared range, choice and list length: a bad value ends in one line (ConfigError) naming its key.
Schemas declare no defaults: the defaults live in the YAML files of conf/ (tests/test_config_schema.py
checks that the two declare the same keys), and clamp kinds (model/clamps.py) use the same fields.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from ihstudy.errors import ConfigError

MAX_SEED = 2**63 - 1  # every seed of a config lies in [0, MAX_SEED]


@dataclass(frozen=True)
class Range:
    """The values a number takes: [low, high], or (low, high] if low_open."""

    low: float
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{']' if self.high < math.inf else ')'}"

    def check(self, key: str, value: float) -> None:
        if value not in self:
            bound = f"above {_number(self.low)}" if self.low_open else f"at least {_number(self.low)}"
            raise ConfigError(f"{key}={_number(value)} must " + (f"be {bound}" if self.high == math.inf else f"lie in {self}"))


def within(low: float, high: float = math.inf, *, default=MISSING, low_open: bool = False, length: int | None = None):
    """A field whose number (or every number of its list, which holds `length` of them) lies in the range."""
    return field(default=default, metadata={"range": Range(low, high, low_open), "length": length})


def one_of(*choices, default=MISSING):
    """A field that takes one of `choices`."""
    return field(default=default, metadata={"choices": choices})


def non_empty():
    """A list field that holds at least one element."""
    return field(default=MISSING, metadata={"length": "non-empty"})


def check_schema(schema: type, node: DictConfig, where: str, what: str | None = None, skip=()) -> None:
    """Check `node`, but for its keys in `skip`, against `schema`: OmegaConf types it (a value it converts,
    e.g. a quoted number, is written back into `node` converted), then each field's range, choices and
    length are checked. Raises ConfigError naming `where`.KEY for a key the schema does not declare
    (`what` names the schema's owner in that message: an optimizer, a data source), a value of another
    type or outside its field's range or choices, and a missing value."""
    own = OmegaConf.masked_copy(node, [key for key in node if key not in skip]) if any(k in node for k in skip) else node
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(_structured(schema), own), resolve=True)
    except ConfigKeyError as exc:
        settings = ", ".join(f.name for f in fields(schema))
        raise ConfigError(f"{_key(where, exc.key)} is not a setting of {what or where} (its settings: {settings})") from None
    except ValidationError as exc:
        name = _culprit(schema, own, exc)
        raise ConfigError(f"{_key(where, name)} must be {describe(schema, name)}, got {node.get(name)!r}") from None
    raw = OmegaConf.to_container(own, resolve=True)
    for f in fields(schema):
        key, value = _key(where, f.name), typed[f.name]
        if value == "???":  # OmegaConf's MISSING: a key the schema declares that the config leaves unset
            raise ConfigError(f"missing config value: {key} (set it on the command line, e.g. {key}=...)")
        _check_field(schema, f, key, value)
        if not (type(raw[f.name]) is type(value) or isinstance(value, float)) or raw[f.name] != value:
            node[f.name] = value  # converted by OmegaConf: "12" -> 12, "yes" -> true (an int stays where a float goes)


def describe(schema: type, name: str) -> str:
    """What a field takes, as the refusal of a bad value says it: "an integer", "a list of 2 numbers"."""
    f = next(f for f in fields(schema) if f.name == name)
    kind, optional = _unwrap(typing.get_type_hints(schema)[name])
    if f.metadata.get("choices"):
        text = f"one of {', '.join(str(c).lower() if isinstance(c, bool) else str(c) for c in f.metadata['choices'])}"
    elif typing.get_origin(kind) is list:
        length = f.metadata.get("length")
        count = "" if length is None else f"{length} "
        text = f"a {count}list of {_plural(typing.get_args(kind)[0])}" if isinstance(length, str) else \
            f"a list of {count}{_plural(typing.get_args(kind)[0])}"
    else:
        text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(kind, str(kind))
    return f"null or {text}" if optional else text


# --- the walk --------------------------------------------------------------------------------------


def _check_field(schema: type, f: Field, key: str, value) -> None:
    choices, valid, length = f.metadata.get("choices"), f.metadata.get("range"), f.metadata.get("length")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be {describe(schema, f.name)}, got {value!r}")
    if isinstance(value, list) and length is not None and (len(value) != length if isinstance(length, int) else not value):
        raise ConfigError(f"{key} must be {describe(schema, f.name)}, got {value!r}")
    for index, number in _numbers(value, key):
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{index} must be a finite number, got {number!r}")
        if valid is not None:
            valid.check(index, number)


def _numbers(value, key: str):
    """(key[i][j], number) for every number of a value or of its (nested) lists."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{key}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value


def _key(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


@functools.cache
def _structured(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def _culprit(schema: type, node: DictConfig, exc: ValidationError) -> str:
    """The field whose value OmegaConf refused: the head of the error's key, else the first field that
    fails alone (OmegaConf names an element of a nested list without its field)."""
    head = str(exc.full_key).split(".")[0].split("[")[0]
    names = [f.name for f in fields(schema)]
    if head in names:
        return head
    for name in names:
        if name in node:
            try:
                OmegaConf.merge(_structured(schema), {name: node[name]})
            except ValidationError:
                return name
    return names[0]


def _unwrap(kind) -> tuple[type, bool]:
    """(the type, whether it may be None) of an annotation like Optional[list[int]]."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _plural(kind) -> str:
    if typing.get_origin(kind) is list:
        return f"lists of {_plural(typing.get_args(kind)[0])}"
    return {int: "integers", float: "numbers", str: "names"}.get(kind, str(kind))


def _number(x: float) -> str:
    """A number as written in a message: integers exactly (a seed bound), others as %g."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, int) or (math.isfinite(x) and x.is_integer() and abs(x) < 1e16):
        return str(int(x))
    return f"{x:g}"
