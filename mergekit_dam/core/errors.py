"""The one error type a user's setup problem raises."""


class DamError(ValueError):
    """A problem with the user's DAM setup; the message names it and the fix, on one line."""
