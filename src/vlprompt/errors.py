"""User-facing errors.

Every problem caused by the user's input (a path, a file, an option value) is raised as a
``VlpromptError`` whose message is one line naming the offending thing. The command line prints
that line and exits non-zero without a stack trace; Python users can catch the class.
"""


class VlpromptError(Exception):
    """An error in the user's input or environment, reported as a single clear line."""
