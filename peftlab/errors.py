"""peftlab's one error type: a message that names the problem and the fix."""


class PeftlabError(Exception):
    """Bad input or state the user can fix. The CLI prints it as one line, never a traceback."""


def unknown(kind: str, name: str, valid: list[str] | tuple[str, ...], hint: str = "") -> PeftlabError:
    """The error for a misspelled or unknown name, listing the valid ones."""
    msg = f"unknown {kind} '{name}'; valid: {', '.join(valid)}"
    return PeftlabError(msg + (f" ({hint})" if hint else ""))
