"""The run config's schemas (ihstudy/schema.py) and conf/'s YAML files declare the same keys, and every
field of every schema refuses a value of another type or out of its range in one line naming the key."""

import copy
import functools
import math
import typing
from dataclasses import fields

import pytest
from omegaconf import DictConfig, OmegaConf

from ihstudy.config import CHOSEN_SCHEMAS, RunSettings, check_values, compose_config, compose_with_hydra, conf_dir, schema_of
from ihstudy.errors import ConfigError
from ihstudy.schema import Range, describe
from ihstudy.training.trackers import TRACKERS, check_trackers

# Groups no schema types: experiment/ holds sweep presets (overrides of the other groups), clamp/ the
# specs that model/clamps.py builds and checks by each kind's own fields.
UNTYPED_GROUPS = ("experiment", "clamp")
NOT_SETTINGS = ("_target_",)  # the task family a task config names, not one of its settings
OPTION_OVERRIDES = {"features_file": ["data.path=features.npy"]}  # what an option leaves to the command line


def options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file of a config group that a schema types."""
    return sorted((path.parent.name, path.stem) for path in conf_dir().glob("*/*.yaml")
                  if path.parent.name not in UNTYPED_GROUPS)


def typed_parts(cfg, group: str) -> list[tuple[str, type, set[str]]]:
    """(where, schema, the keys it types) of a config group: the group itself, or each tracker of logger."""
    if group == "logger":
        return [(f"logger.{name}", TRACKERS[name].schema, set(settings)) for name, settings in cfg.logger.items()]
    chooser = CHOSEN_SCHEMAS.get(group, ("",))[0]
    return [(group, schema_of(cfg, group), {key for key in cfg[group] if key not in (chooser, *NOT_SETTINGS)})]


def schema_field_names(schema) -> set[str]:
    return {f.name for f in fields(schema)}


@pytest.mark.parametrize("group,option", options())
def test_each_yaml_option_declares_exactly_the_keys_of_its_schema(group, option):
    cfg = compose_with_hydra([f"{group}={option}"])
    for _, schema, keys in typed_parts(cfg, group):
        assert keys == schema_field_names(schema)


def test_the_top_level_settings_of_config_yaml_are_the_run_settings_schema():
    cfg = compose_with_hydra([])
    scalars = {key for key in cfg if not isinstance(cfg[key], DictConfig)}
    assert scalars == schema_field_names(RunSettings)


# --- a bad value for every field of every schema ---------------------------------------------------


def schema_cases() -> list[tuple[list[str], str, type, str]]:
    """(overrides choosing the schema, the group ("" at the top level), schema, field) for every field
    of every schema a config option chooses."""
    seen, cases = set(), [([], "", RunSettings, f.name) for f in fields(RunSettings)]
    for group, option in options():
        overrides = [f"{group}={option}", *OPTION_OVERRIDES.get(option, [])]
        for where, schema, _ in typed_parts(compose_with_hydra(overrides), group):
            if schema not in seen:
                seen.add(schema)
                cases += [(overrides, where, schema, f.name) for f in fields(schema)]
    return cases


def bad_values(schema, name: str) -> list[tuple[object, str]]:
    """(a value the field must refuse, what the refusal must say) for a field: a value of another type,
    a number out of its range (inside its list, if it is a list), a word not among its choices."""
    f = next(f for f in fields(schema) if f.name == name)
    kind = typing.get_type_hints(schema)[name]
    other_type = {"a": 1} if kind in (str, str | None) else "abc"
    cases = [(other_type, f"must be {describe(schema, name)}, got {other_type!r}")]
    valid: Range | None = f.metadata.get("range")
    if valid is not None:
        number = valid.low if valid.low_open else valid.low - 1 if valid.high == math.inf else valid.high * 2 + 1
        number = int(number) if "int" in str(kind) else float(number)
        value, depth = number, str(kind).count("list[")
        for level in range(depth):  # the innermost list holds the number, the outermost as many as its length
            value = [value] * ((f.metadata.get("length") or 1) if level == depth - 1 else 1)
        with pytest.raises(ConfigError) as refusal:
            valid.check(name + "[0]" * depth, number)
        cases.append((value, str(refusal.value)))
    if f.metadata.get("choices"):
        cases.append(("no_such_choice", f"must be {describe(schema, name)}, got 'no_such_choice'"))
    return cases


CASES = [(overrides, group, name, value, message) for overrides, group, schema, name in schema_cases()
         for value, message in bad_values(schema, name)]


@functools.cache
def composed(overrides: tuple[str, ...]):
    return compose_config(list(overrides))[0]


@pytest.mark.parametrize("overrides,group,name,value,message", CASES,
                         ids=[f"{' '.join(o)}:{g}.{n}={v}" for o, g, n, v, _ in CASES])
def test_every_field_refuses_a_bad_value_in_one_line_naming_key_and_range(overrides, group, name, value, message):
    """The refusal of check_values or check_trackers (compose_config runs both; the commands print it as
    their one line and exit 2: test_hostile_inputs.py)."""
    key = f"{group}.{name}" if group else name
    cfg = copy.deepcopy(composed(tuple(overrides)))
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as refusal:
        check_values(cfg)
        check_trackers(cfg)
    assert str(refusal.value).startswith(key) and "\n" not in str(refusal.value)
    assert message in str(refusal.value)


def test_a_value_the_schema_converts_is_stored_converted_and_an_int_stays_where_a_float_goes():
    cfg, _ = compose_config(["model.n_heads='4'", "optim.lr=1"])
    assert cfg.model.n_heads == 4 and type(cfg.model.n_heads) is int
    assert cfg.optim.lr == 1 and type(cfg.optim.lr) is int  # the saved config keeps what was given


def test_a_key_the_chosen_schema_does_not_declare_is_refused_with_its_settings():
    with pytest.raises(ConfigError, match=r"data.n_classes is not a setting of data.source=file \(its settings: path, dataset\)"):
        compose_config(["data.source=file", "+data.path=x.npy"])
