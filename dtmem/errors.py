"""The one exception type that reaches users as a single line (see cli.main)."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


class Interrupted(Exception):
    """Ctrl-C during long work: the message says what was saved and how to go on
    (exit code 130)."""
