"""CNI error codes and the one exception type every plugin answers with.

Codes 1-99 are the CNI specification's; 100 and up are ours (documented in README.md#error-codes).

The core's error policy:
- Each mechanism raises its own exception type, whose message says what failed on what (StoreError,
  SettingError, DataPathError, NetfilterError, EC2Error, IMDSError, InstanceLimitsError, GrowError);
  a caller's mistake (a bad argument) is a ValueError or TypeError.
- A type whose failure every plugin answers with one code carries it: it subclasses CNIError
  (StoreError 100, SettingError 7, DataPathError 102, NetfilterError 103, GrowError 101), and crosses
  the plugin and the skeleton as it is. A type whose meaning is the caller's is a plain exception
  (EC2Error, IMDSError, InstanceLimitsError: the agent retries and records them, `max-pods` prints
  them, a plugin answers 101, or 11 for a grow EC2 refused), and the caller maps it (aws-snat's IMDS
  fallback; `poolmgr.grow_for_add`, aws-eni-ipam's slow path, into GrowError).
- CNIError itself is raised only where the CNI protocol decides the code: the skeleton, `result`
  and `invoke`, and the plugins' handlers. The skeleton answers anything else with 999.
"""

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

STORE_FAILURE = 100      # the state store is corrupt, unreadable or unwritable
AWS_FAILURE = 101        # EC2 or IMDS answered with an error or not at all
NETLINK_FAILURE = 102    # a link, address, route, neighbour or rule operation failed
NETFILTER_FAILURE = 103  # iptables-save/-restore failed
CHECK_FAILED = 104       # CHECK found the attachment not as ADD left it
ATTACHMENT_EXISTS = 105  # ADD for a (container ID, ifname) that already has an attachment
INTERNAL = 999           # an unexpected exception; the traceback is in the log file


MAX_MSG, MAX_DETAILS = 1024, 4096  # characters: a message may quote input, and input may be megabytes


class CNIError(Exception):
    """A failure reported to the runtime as the CNI error object on stdout."""

    def __init__(self, code: int, msg: str, details: str = ""):
        msg, details = _capped(msg, MAX_MSG), _capped(details, MAX_DETAILS)
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"{self.msg} ({self.details})" if self.details else self.msg


def _capped(text: str, limit: int) -> str:
    """`text`, cut to about `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
