"""peftlab's one error type: a message that names the problem and the fix."""

import difflib


class PeftlabError(Exception):
    """Bad input or state the user can fix. The CLI prints it as one line, never a traceback."""

    def __str__(self) -> str:
        # one line even when the message quotes the user's data (a column name, a YAML error)
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was kept and the command that continues (the CLI prints it)."""


def did_you_mean(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """"did you mean 'X'?" for the valid name closest to a misspelled one, or ""."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, valid: list[str] | tuple[str, ...], hint: str = "") -> PeftlabError:
    """The error for a misspelled or unknown name, listing the valid ones (and the closest)."""
    msg = f"unknown {kind} '{name}'; valid: {', '.join(valid)}" + (f" ({hint})" if hint else "")
    close = did_you_mean(name, valid)
    return PeftlabError(msg + (f"; {close}" if close else ""))


def first_line(e: BaseException) -> str:
    """The first line of another library's error message, to quote inside a one-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
