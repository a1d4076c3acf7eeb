"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A problem with the user's data, reported as one line.

    The message names the file (and the line or record when there is one), says what is wrong and
    how to fix it, e.g. ``data/train.jsonl:17: invalid JSON (Expecting ',' delimiter); fix or remove
    the line``. It subclasses ``ValueError`` so callers that treat all user errors alike can catch
    ``ValueError``.
    """

    def __init__(self, location: str, problem: str, fix: str):
        """Builds the one-line message ``"<location>: <problem>; <fix>"``.

        Args:
            location: the file, optionally with ``:line`` or ``record N``.
            problem: what is wrong.
            fix: what the user should do about it.
        """
        message = f"{location}: {problem}; {fix}"
        super().__init__(" ".join(message.split()))
        self.location = location
