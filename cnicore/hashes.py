"""The digests the plugins compute, from CPython's own implementations.

`import hashlib` loads OpenSSL's libcrypto, ~2.5-3 ms of every plugin exec that imports it; the
built-in modules give the same digests. Each is loaded when first asked for (each is a shared library
of its own, and a plugin needs one or two). Python 3.12 renamed _sha256/_sha512 to _sha2.
"""

__all__ = ["blake2b", "sha1", "sha256", "sha512"]


def __getattr__(name: str):
    if name == "sha1":
        from _sha1 import sha1 as function
    elif name == "blake2b":
        from _blake2 import blake2b as function
    elif name in ("sha256", "sha512"):
        try:  # Python 3.11: one library each
            function = getattr(__import__(f"_{name}"), name)
        except ImportError:
            function = getattr(__import__("_sha2"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = function
    return function
