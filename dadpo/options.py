"""Config fields that carry their own flag help: the one place a default and its help are written.

Every command's config is a dataclass whose fields are declared with `option(default, "help")`; the
command-line layer builds its flags from those fields (dadpo/cli/options.py), so a default is stated
once, and a recipe that wants another default declares the field again in its own config class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

REQUIRED = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, choices: tuple | None = None, metavar: str | None = None,
           flag: str | None = None, cli: bool = True, default_text: str | None = None,
           factory=None) -> Any:
    """A dataclass field with its flag's help text.

    flag: the flag name when it differs from --field-name; cli=False: not a flag (set by code);
    default_text: what --help shows as the default when it is computed (e.g. "the models' limit")."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "flag": flag, "cli": cli,
                "default_text": default_text}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
