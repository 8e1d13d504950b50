"""The CPU mode's error type (no verl import, so every part can raise it before verl loads)."""


class CPUModeError(RuntimeError):
    """A setting or installation that verl's CPU mode cannot run with; the message names the fix."""
