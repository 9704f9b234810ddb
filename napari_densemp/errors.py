"""The one exception type users see: it names the problem and, where possible, the fix."""


class DenseMPError(ValueError):
    """Bad input or a bad setup that the user can correct.

    The CLI turns it into one line on stderr and a non-zero exit; the widget into a
    notification. Anything else that escapes is a bug.
    """
