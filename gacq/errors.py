"""The one exception type users see.

Every problem with user input (paths, files, options) is raised as a
`GacqError` whose message names the problem and the fix. The CLI prints the
message without a traceback and exits with status 2.
"""


class GacqError(Exception):
    """A problem with the user's input, explained in the message."""
