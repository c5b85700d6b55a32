"""The one exception type the studio shows to people."""


class StudioError(Exception):
    """A problem the user can fix. The message names what is wrong, where, and what to do."""


class Cancelled(StudioError):
    """The user stopped the job; nothing was left behind."""
