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


class RunStopped(UserError):
    """The run stopped on purpose, on every rank at once (a teacher failed, too many
    non-finite steps in a row). Rank 0 reports it (already, when `reported`: under
    torchrun the first rank to exit gets the others killed); the other ranks exit quietly."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


class RetryableAnswer(Exception):
    """A well-formed server answer that says the work was not done and may be asked again
    (SGLang's HTTP 200 with `finish_reason.type == "abort"`). Raised while reading an
    answer; the SGLang client retries the request like a 5xx answer."""
