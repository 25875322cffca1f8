"""The one exception type that means "the user's input is wrong": shown as one sentence."""


class UserError(ValueError):
    """Bad input (config, data, paths): the message names the bad value and the fix."""
