"""The exception every `sweep` command raises for a problem with the user's input (torch-free:
imported by the command modules, bench/ and tests without pulling in anything else)."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""
