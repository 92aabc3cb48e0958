"""The digests the plugins compute, from CPython's own implementations.

`import hashlib` loads OpenSSL's libcrypto, ~2.5-3 ms of every plugin exec that imports it; the
built-in modules give the same digests. (Python 3.12 renamed _sha256/_sha512 to _sha2.)
"""

from _blake2 import blake2b
from _sha1 import sha1

try:
    from _sha256 import sha256
    from _sha512 import sha512
except ImportError:
    from _sha2 import sha256, sha512

__all__ = ["blake2b", "sha1", "sha256", "sha512"]
