"""The one error tree of dfzmq.

Every error that library code raises on purpose derives from `DfzmqError`. Only the CLI turns
these into exit codes and one-line messages; library code never calls `sys.exit`.
Protocol errors split by blame, as h11 does: `LocalProtocolError` (we tried to send something
invalid) and `RemoteProtocolError` (the other side sent something invalid).
"""


class DfzmqError(Exception):
    """Base of every dfzmq error. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(DfzmqError):
    """A setting is missing, malformed or contradictory."""

    exit_code = 2


class ProtocolError(DfzmqError):
    """A message broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to encode a message that is not valid: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """A peer sent frames that do not decode to a valid message."""


class DownloadError(DfzmqError):
    """A download could not be completed; `.args[0]` is a one-line reason for the user."""

    exit_code = 3


class SourceError(DownloadError):
    """The origin refused or failed (HTTP status, DNS, connection, file not found).

    `transient` errors (a connection cut mid-body, a timeout, a 5xx answer) are worth a retry;
    the others (4xx, an unknown host, a bad URL) are the origin's final word."""

    def __init__(self, message: str, transient: bool = False, final: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.final = final  # the origin answered no (a 4xx): no peer will do better


class IntegrityError(DownloadError):
    """Bytes did not match their expected digest."""


class StorageError(DownloadError):
    """The local disk or piece store failed (full disk, permissions)."""


class UnavailableError(DfzmqError):
    """A service (daemon, scheduler, manager) did not answer in time."""

    exit_code = 4
