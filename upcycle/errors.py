"""The one exception type users see: a one-line message, printed by the CLI without a traceback."""


class UpcycleError(Exception):
    """A problem with the user's input or environment, phrased as one line that names it."""
