"""The base of every error that is a user mistake rather than a bug.

The CLI prints such an error as one line (no traceback); the web layer maps it to a 4xx.
"""


class UserFacingError(Exception):
    """str(error) is a complete, one-line explanation for the user."""


class CommandError(UserFacingError):
    """A command (MQTT, REST, CLI) that cannot be carried out; str() is the reason given back."""


class DatabaseUnreachable(Exception):
    """The `database` cannot be opened (missing, refused, login refused); str() is one line naming the setting.

    Not a UserFacingError: while the hub runs, an outage is the server's failure, not the client's.
    """
