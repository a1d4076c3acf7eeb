"""The one exception type of the converter: a problem the user can fix, said in one line."""

from __future__ import annotations


class ConversionError(ValueError):
    """`<where>: <what>; <how to fix>`; the CLI prints it as one line and exits non-zero."""

    def __init__(self, where: str, what: str, fix: str | None = None) -> None:
        super().__init__(f"{where}: {what}" + (f"; {fix}" if fix else ""))
        self.where, self.what, self.fix = where, what, fix

    @classmethod
    def wrap(cls, where: str, err: Exception) -> "ConversionError":
        """A library ValueError (already "what; how to fix") located at `where`."""
        message = str(err)
        if message.startswith(where):
            message = message[len(where):].lstrip(": ")
        return cls(where, message)
