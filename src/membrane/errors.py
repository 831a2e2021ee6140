"""Errors that reach the user. Anything else escaping the CLI is a bug."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: reported as one line naming the field and the problem, exit code 2.
    Raise it before changing anything, so what is in force stays as it was."""

    exit_code = 2

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class NotPermitted(UserError):
    """The caller lacks a privilege or the kernel lacks a feature the command needs."""


class NotFound(UserError):
    """A named object does not exist (HTTP 404 from the agent's API)."""
