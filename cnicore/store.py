"""The node's state store: one JSON document per network, guarded by an flock.

Writes are atomic (temp file, fsync, rename, directory fsync), so a writer killed at any instant
leaves either the old or the new document. A corrupt or unreadable document is never silently
reset: opening it raises StoreError, and only `set_aside` (used by the agent's rebuild) moves it away.
The envelope and the small members (cnicore.pool.HEAD: the node facts) are written first, so a
reader that needs only those (`read_head`: aws-snat) parses no ENI.
"""

from __future__ import annotations

import fcntl
import os
import time

from . import jsonio
from .errors import CNIError, STORE_FAILURE
from .fsutil import fsync_dir, make_dirs, write_atomic
from .pool import HEAD

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)  # schema 1 is schema 2 without IPv4 prefixes (cnicore.pool); it is written back as 2
DEFAULT_DIR = "/var/run/aws-vpc-cni"
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")


def _valid_name(name: str) -> bool:
    r"""What re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) accepts (no trailing newline, which
    re.match's "$" would let through), without importing re."""
    return name[:1] in _ALNUM and all(c in _NAME_CHARS for c in name)


class StoreError(CNIError):
    def __init__(self, msg: str, details: str = ""):
        super().__init__(STORE_FAILURE, msg, details)


class Store:
    """The document of one network in `data_dir`; every access goes through `locked()`."""

    def __init__(self, data_dir: str, network: str):
        if not _valid_name(network or ""):
            raise StoreError(f"invalid network name for the state store: {network!r}")
        self.data_dir = data_dir
        self.network = network
        self.path = os.path.join(data_dir, f"{network}.json")
        self.lock_path = os.path.join(data_dir, f"{network}.lock")

    def locked(self, shared: bool = False) -> _Locked:
        """Hold the network's lock (exclusive unless `shared`) for a `with` block, which gets a
        Transaction."""
        return _Locked(self, shared)

    def set_aside(self) -> str | None:
        """Move an unusable document out of the way (caller holds the lock); return where it went."""
        if not os.path.exists(self.path):
            return None
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.rename(self.path, aside)
        fsync_dir(self.data_dir)
        return aside


def _serialised(doc: dict) -> bytes:
    """The envelope and the small members first (what `read_head` parses), then the others; keys
    sorted within each part."""
    head = {key: doc[key] for key in ("schema", "network", *HEAD) if key in doc}
    rest = {key: value for key, value in doc.items() if key not in head}
    text = jsonio.dumps(head, separators=(",", ":"), sort_keys=True)
    if rest:
        text = text[:-1] + "," + jsonio.dumps(rest, separators=(",", ":"), sort_keys=True)[1:]
    return text.encode()


class _Locked:
    """The context manager `Store.locked` returns (a class rather than contextlib.contextmanager,
    which aws-eni-ipam's start does not load: README "Start-up cost")."""

    def __init__(self, store: Store, shared: bool):
        self.store = store
        self.shared = shared
        self.fd: int | None = None

    def __enter__(self) -> Transaction:
        store = self.store
        try:
            make_dirs(store.data_dir)
            fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the state store lock {store.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return Transaction(store, writable=not self.shared)

    def __exit__(self, *exc_info) -> bool:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing releases the flock
        return False


class Transaction:
    """Read and write the document while the lock is held."""

    def __init__(self, store: Store, writable: bool):
        self.store = store
        self.writable = writable

    def read(self) -> dict | None:
        """The document, or None if the network has none yet."""
        raw = self._raw()
        return None if raw is None else self._parsed(raw)

    def read_head(self) -> dict | None:
        """The document's envelope and its small members (cnicore.pool.HEAD) only, or None if the
        network has none yet: the ENIs after them are not parsed (nor found corrupt: aws-eni-ipam and
        the agent, which read them, do). Anything unexpected in what it reads (or a document written
        in another order) is parsed whole, as `read` does."""
        raw = self._raw()
        if raw is None:
            return None
        head = jsonio.load_leading(raw, ("schema", "network", *HEAD))
        return head if head is not None and self._ours(head) else self._parsed(raw)

    def _raw(self) -> bytes | None:
        path = self.store.path
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the state file {path}: {exc.strerror}") from None

    def _parsed(self, raw: bytes) -> dict:
        path = self.store.path
        try:
            doc = jsonio.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"the state file {path} is corrupt and was left as it is: {exc}",
                             "the node agent rebuilds it from EC2 and the host, keeping the bad file aside") from None
        if not self._ours(doc):
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise StoreError(f"the state file {path} is not a schema-{SCHEMA} (or {READABLE_SCHEMAS[0]}) document "
                             f"of network {self.store.network!r} (found schema {found!r}); it was left as it is")
        return doc

    def _ours(self, doc) -> bool:
        return (isinstance(doc, dict) and doc.get("schema") in READABLE_SCHEMAS
                and doc.get("network") == self.store.network)

    def write(self, doc: dict) -> None:
        if not self.writable:
            raise StoreError("the state store was opened read-only")
        doc["schema"] = SCHEMA
        doc["network"] = self.store.network
        data = _serialised(doc)
        try:
            write_atomic(self.store.path, data, durable=True)
        except OSError as exc:
            raise StoreError(f"cannot write the state file {self.store.path}: {exc.strerror}") from None
