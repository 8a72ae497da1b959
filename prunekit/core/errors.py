"""One exception type for every user-facing error: the CLI prints its message on one line and exits 2."""


class PrunekitError(ValueError):
    """Bad input or an unsupported situation, with a message meant for the user."""
