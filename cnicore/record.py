"""Immutable records: what collections.namedtuple gives, without importing `collections`.

Importing `collections` (with keyword, operator, reprlib and its dozen classes) and compiling each
namedtuple class from source is paid on every exec (README "Start-up cost"), while the records
(rules, table states, settings) need only this: a tuple subclass with named fields, defaults,
keyword arguments, a repr, `_replace` and `_fields`. Equality, hashing, ordering
and JSON (a list) are the tuple's, as for a namedtuple.
"""

from __future__ import annotations

import sys
from _collections import _tuplegetter


def record(typename: str, field_names: str, *, defaults=()) -> type:
    """A tuple subclass named `typename` with the fields of `field_names` (space-separated), the last
    len(`defaults`) of them optional, as collections.namedtuple(typename, field_names, defaults=...)."""
    fields = tuple(field_names.split())
    if len(set(fields)) != len(fields) or not all(name.isidentifier() and not name.startswith("_")
                                                  for name in fields):
        raise ValueError(f"bad field names for {typename}: {field_names!r}")
    if len(defaults) > len(fields):
        raise TypeError(f"{typename}: more defaults than fields")
    field_defaults = dict(zip(fields[len(fields) - len(defaults):], defaults))

    def __new__(cls, *args, **kwargs):
        if len(args) > len(fields):
            raise TypeError(f"{typename}() takes {len(fields)} arguments but {len(args)} were given")
        values = list(args)
        for name in fields[len(args):]:
            if name in kwargs:
                values.append(kwargs.pop(name))
            elif name in field_defaults:
                values.append(field_defaults[name])
            else:
                raise TypeError(f"{typename}() missing required argument: {name!r}")
        if kwargs:
            raise TypeError(f"{typename}() got unexpected or repeated arguments: {', '.join(sorted(kwargs))}")
        return tuple.__new__(cls, values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{name}={value!r}" for name, value in zip(fields, self)) + ")"

    def _replace(self, **changes):
        """A copy with the named fields changed."""
        values = [changes.pop(name, value) for name, value in zip(fields, self)]
        if changes:
            raise ValueError(f"{typename} has no fields {sorted(changes)}")
        return tuple.__new__(type(self), values)

    def __getnewargs__(self):
        return tuple(self)

    namespace = {"__slots__": (), "__new__": __new__, "__repr__": __repr__, "_replace": _replace,
                 "__getnewargs__": __getnewargs__, "_fields": fields, "_field_defaults": field_defaults,
                 "__match_args__": fields, "__module__": sys._getframe(1).f_globals.get("__name__", "__main__")}
    for index, name in enumerate(fields):
        namespace[name] = _tuplegetter(index, f"{typename}.{name}")
    return type(typename, (tuple,), namespace)
