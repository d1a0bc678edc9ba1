"""The one exception type that reaches users as a single line (the CLI prints it, exits 2), and
the one way a third-party message becomes part of such a line."""


class DadpoError(Exception):
    """Bad input or a refused request. The message names what is wrong and where (file, row id,
    flag); the CLI prints it as one line with no traceback."""


def one_line(text, limit: int = 300) -> str:
    """`text` with every run of whitespace (newlines too) made one space, cut to `limit` characters
    ("..." ends a cut one): third-party text can span lines and pages; ours is one line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message as one_line(), or its type's name when
    the message is empty (a bare KeyError, a template's raise_exception(''))."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return one_line(lines[0], limit) if lines else type(exc).__name__
