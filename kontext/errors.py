"""The one exception type for problems with a user's input: a missing file, a corrupt image,
a wrong config key, a checkpoint that does not fit. Entry points print its message as one
line and exit with status 2 instead of showing a traceback."""


class KontextError(Exception):
    """A problem with the user's input or configuration, explained in its message."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the cause
    quoted in a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
