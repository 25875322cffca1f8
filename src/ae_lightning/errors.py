"""The one exception type that means "the user's input is wrong": shown as one sentence."""


class UserError(ValueError):
    """Bad input (config, data, paths): the message names the bad value and the fix."""


class RunInterrupted(Exception):
    """SIGTERM stopped training after a checkpoint of the exact step: exit 143, then resume."""

    def __init__(self, message: str, resume_command: str) -> None:
        super().__init__(message)
        self.resume_command = resume_command
