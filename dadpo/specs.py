"""Load the versioned file-format schemas in data_specs/ (installed as dadpo.data_specs) and
check records against them.

The validator covers the JSON Schema subset the specs use (type, required, properties,
additionalProperties, items, enum, minimum, pattern, local $ref), which keeps dadpo free of another
dependency while the specs stay plain JSON Schema any tool can read.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

from dadpo.errors import DadpoError

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


@lru_cache(maxsize=None)
def load_spec(name: str) -> dict:
    return json.loads(resources.files("dadpo.data_specs").joinpath(name).read_text(encoding="utf-8"))


def schema_errors(value, schema: dict, path: str = "$", root: dict | None = None) -> list[str]:
    """Every way `value` breaks `schema`, as 'path: problem'."""
    root = root or schema
    if "$ref" in schema:  # local references only: "#/$defs/name"
        target = root
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        schema = target
    errors = []
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        # bool is an int subclass in Python; JSON keeps them apart
        if not any(isinstance(value, _TYPES[n]) and not (n in ("integer", "number") and isinstance(value, bool)) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing '{key}'")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors.extend(schema_errors(item, properties[key], f"{path}.{key}", root))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key '{key}'")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors.extend(schema_errors(item, schema["items"], f"{path}[{index}]", root))
    return errors


def validate_json(value, spec_name: str, where: str) -> None:
    errors = schema_errors(value, load_spec(spec_name))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DadpoError(f"{where}: does not follow data_specs/{spec_name}: {errors[0]}{more}")
