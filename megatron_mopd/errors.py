"""User-facing errors.

A `UserError` is a mistake in the user's input (a config key, a file, a server, a layout).
The CLI prints it as one line on stderr and exits non-zero, without a traceback;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """A bad configuration value; the message names the key path (e.g. `parallel.tp`)."""


class TeacherError(UserError):
    """A teacher or inference server failed (down, timed out, or answered malformed data)."""
