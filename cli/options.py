"""Click options built from the library's config dataclasses, so each default and its help are
written once (in the dataclass field, dadpo.options.option) and every command shows the same.

    @config_options(TrainConfig)            one --flag per field (and per field of nested configs)
    def command(**flags):
        cfg = build_config(TrainConfig, flags)
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import click


def _fields(cls) -> list[tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _base_type(annotation):
    """int | None -> (int, True); list -> (list, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return (origin or annotation), False


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def parse_key_values(items, flag: str) -> dict:
    """KEY=VALUE strings to a dict; VALUE is JSON when it parses (numbers, true, lists), else a string."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=flag)
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def _option(field: dataclasses.Field, annotation, prefix: str, override: dict, default):
    meta = {**field.metadata, **override}
    kind, optional = _base_type(annotation)
    name = meta.get("flag") or field.name.replace("_", "-")
    flag = f"--{name}"
    help_text = meta.get("help", "")
    if meta.get("default_text"):
        help_text += f" [default: {meta['default_text']}]"
    kwargs: dict = {"help": help_text}
    dest = prefix + field.name
    if kind is bool:
        return click.option(flag, dest, is_flag=True, default=bool(default), help=help_text)
    if kind in (list, dict):
        return click.option(flag, dest, multiple=True, metavar=meta.get("metavar"), help=help_text)
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        kwargs["show_default"] = default is not None and not meta.get("default_text")
    kwargs["type"] = click.Choice(list(meta["choices"])) if meta.get("choices") else kind
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    return click.option(flag, dest, **kwargs)


def _options(cls, exclude: set[str], overrides: dict, prefix: str = "", instance=None) -> list:
    """Options for cls's fields; a nested config's defaults are those of its parent's default instance."""
    found = []
    for field, annotation in _fields(cls):
        path = prefix + field.name
        if path in exclude or not field.metadata.get("cli", True):
            continue
        default = getattr(instance, field.name) if instance is not None else _default(field)
        if dataclasses.is_dataclass(annotation):
            found += _options(annotation, exclude, overrides, path + ".", default)
        else:
            found.append(_option(field, annotation, prefix.replace(".", "__"), overrides.get(path, {}), default))
    return found


def config_options(cls, *, exclude: tuple[str, ...] = (), overrides: dict | None = None):
    """Decorator: one click option per (nested) field of `cls`, less `exclude` (dotted names, e.g.
    "engine.seed"); `overrides` maps a dotted name to option() keywords for this command (help,
    default_text). A `progress` field becomes --quiet."""

    def decorate(command):
        options = _options(cls, set(exclude), overrides or {})
        if any(f.name == "progress" for f, _ in _fields(cls)):
            options.append(click.option("--quiet", is_flag=True, help="No progress bars."))
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def build_config(cls, flags: dict, prefix: str = "", **fixed):
    """The config `cls` from the flags config_options made (they are removed from `flags`)."""
    values = {}
    for field, annotation in _fields(cls):
        key = prefix + field.name
        if dataclasses.is_dataclass(annotation):
            values[field.name] = build_config(annotation, flags, key + "__", **fixed.pop(field.name, {}))
            continue
        if key not in flags:
            continue
        value = flags.pop(key)
        kind, _ = _base_type(annotation)
        if kind is dict:
            value = parse_key_values(value, f"--{field.metadata.get('flag') or field.name.replace('_', '-')}")
        elif kind is list:
            value = list(value)
        values[field.name] = value
    if prefix == "" and "quiet" in flags:
        values["progress"] = not flags.pop("quiet")
    values.update(fixed)
    return cls(**values)


# The engine flags of the commands that sample (generate, eval): the engine seed is their --seed, and
# fp32_head and max_num_batched_tokens only matter to scoring passes.
SAMPLING_ENGINE_EXCLUDE = ("engine.seed", "engine.fp32_head", "engine.max_num_batched_tokens")
SAMPLING_ENGINE_OVERRIDES = {"engine.batch_size": {"help": "hf: prompts per model.generate call."},
                             "engine.max_model_len": {"default_text": "the model's"}}
