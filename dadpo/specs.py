"""Load the versioned file-format schemas in data_specs/ (installed as dadpo.data_specs) and
check records against them with the jsonschema library (the schemas declare their draft).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import jsonschema

from dadpo.errors import DadpoError


@lru_cache(maxsize=None)
def load_spec(name: str) -> dict:
    return json.loads(resources.files("dadpo.data_specs").joinpath(name).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _spec_validator(name: str):
    schema = load_spec(name)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)  # a broken spec file is our bug: fail loudly, not silently pass
    return validator_class(schema)


_MESSAGE_CHARS = 200  # jsonschema quotes the offending value, which can be a whole record


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message if len(error.message) <= _MESSAGE_CHARS else error.message[:_MESSAGE_CHARS] + "..."
    return f"{error.json_path}: {message}"


def _errors(validator, value) -> list[str]:
    errors = list(validator.iter_errors(value))
    if not errors:
        return []
    # The most telling error first (jsonschema descends into anyOf/oneOf to find it), then the others.
    best = jsonschema.exceptions.best_match(errors)
    top = best
    while top.parent is not None:
        top = top.parent
    return [_describe(best)] + [_describe(error) for error in errors if error is not top]


def schema_errors(value, schema: dict) -> list[str]:
    """Every way `value` breaks `schema`, as 'JSON path: problem', the most relevant first."""
    return _errors(jsonschema.validators.validator_for(schema)(schema), value)


def validate_json(value, spec_name: str, where: str) -> None:
    errors = _errors(_spec_validator(spec_name), value)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DadpoError(f"{where}: does not follow data_specs/{spec_name}: {errors[0]}{more}")
