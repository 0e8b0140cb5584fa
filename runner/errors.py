"""The project's one error type: a bad input or an unusable setup, reported as one line."""


class RunnerError(Exception):
    """A user-facing error. `cli.py` prints `error: <message>` and exits 1, no traceback.

    The message names the field (e.g. `parallel.dcp`) and what is allowed.
    """


class RequestError(RunnerError):
    """One request is invalid; it fails alone and the others still run."""
