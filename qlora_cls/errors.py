"""The one exception type that entry points turn into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a flag, a path, a dataset or a template.

    The message must say what was wrong and what would be valid, on one line.
    """
