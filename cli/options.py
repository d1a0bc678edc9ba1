"""Flag parsing shared by several commands."""

from __future__ import annotations

import json

import click


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
