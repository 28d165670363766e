"""The exception every script turns into one line on stderr and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (a flag, a path); reported as one line, exit status 2."""
