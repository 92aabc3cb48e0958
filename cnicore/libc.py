"""The few libc functions the plugins call that Python's os module lacks (setns on 3.11, getsockopt
with an input buffer), through the _ctypes extension alone: the ctypes package costs ~1.5 ms more to
import per exec (BENCHMARKS.md). ctypes itself where _ctypes' internals differ."""

from __future__ import annotations


class CTypes:
    """What the callers use of ctypes: `function(name)` (int-returning, errno kept for
    `get_errno`), `c_uint32`, `char_array(length)` and `byref`."""

    def __init__(self, lookup, c_uint32, char_array, byref, get_errno):
        self._lookup, self._functions = lookup, {}
        self.c_uint32, self.char_array, self.byref, self.get_errno = c_uint32, char_array, byref, get_errno

    def function(self, name: str):
        found = self._functions.get(name)
        if found is None:
            found = self._functions[name] = self._lookup(name)
        return found


_loaded: CTypes | None = None


def ctypes_lite() -> CTypes:
    global _loaded
    if _loaded is None:
        try:
            _loaded = _bare()
            _loaded.function("getpid")  # the lookup works too
        except (ImportError, AttributeError, TypeError, OSError):
            _loaded = _full()
    return _loaded


def _bare() -> CTypes:
    import _ctypes

    class c_int(_ctypes._SimpleCData):
        _type_ = "i"

    class c_uint32(_ctypes._SimpleCData):
        _type_ = "I"

    class c_char(_ctypes._SimpleCData):
        _type_ = "c"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = c_int

    libc = _ctypes.dlopen(None)

    def char_array(length):
        return type("Buffer", (_ctypes.Array,), {"_type_": c_char, "_length_": length})

    return CTypes(lambda name: Function(_ctypes.dlsym(libc, name)), c_uint32, char_array, _ctypes.byref,
                  _ctypes.get_errno)


def _full() -> CTypes:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return CTypes(lambda name: getattr(libc, name), ctypes.c_uint32, lambda length: ctypes.c_char * length,
                  ctypes.byref, ctypes.get_errno)

