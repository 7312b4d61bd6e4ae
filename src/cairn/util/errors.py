"""The one exception type the CLI turns into a one-line message and exit code 2."""


class CairnError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class SharedError(CairnError):
    """Under torchrun: rank 0's error, raised again on the other ranks, which stay quiet about it."""
