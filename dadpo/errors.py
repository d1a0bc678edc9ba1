"""The one exception type that reaches users as a single line (the CLI prints it, exits 2)."""


class DadpoError(Exception):
    """Bad input or a refused request. The message names what is wrong and where
    (file, row id, flag); the CLI prints it as one line with no traceback."""
