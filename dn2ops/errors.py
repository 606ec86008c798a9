"""dn2's own exception type for the user's mistakes.

A ``UserError``'s message is the whole story (a missing file, a flag that does not fit,
an index built with another backbone): the command line prints it without a traceback.
Every other exception is a bug or a surprise, and prints its traceback. Each stage's
error (``OutputError``, ``SourceError``, ``WeightsError``, ...) subclasses UserError; those
that were ``ValueError``s stay ``ValueError``s too, so callers that caught them still do.
"""


class UserError(Exception):
    """A failure caused by what the user asked for or pointed dn2 at."""


class ConfigError(UserError, ValueError):
    """Flags or configuration values that no job can run (dn2ops.config's checks)."""
