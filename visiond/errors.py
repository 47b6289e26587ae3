"""Errors a user can fix; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, option, data): one clear line, exit code 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be served; the message is one line for the operator."""
