"""The one exception saekit raises for bad input: the CLI prints its message as one line and exits 2."""


class SaekitError(Exception):
    """A problem the user can fix. The message names the problem and the fix, in one line."""
