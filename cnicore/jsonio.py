"""json.loads and json.dumps for the plugins, without importing the json package on the way.

`import json` imports re, and with it enum, functools, collections, copyreg, ... on every plugin
exec (README "Start-up cost"). This module drives the C
accelerator (_json) the way the json package drives it, and leaves everything else to json itself:
an input or object the fast path does not take as json would (any error, a BOM or UTF-16/32 input,
a type other than dict, list, str, int, bool and None for an indented dump, ...) is handed to
json.loads or json.dumps, imported then. So results, and errors with their messages, are json's;
tests/unit/test_jsonio.py compares the two on generated documents and byte strings.
"""

try:
    import _json
except ImportError:  # an interpreter without the accelerator: json does it all
    _json = None

_WHITESPACE = " \t\n\r"  # json.decoder.WHITESPACE


class _Fallback(Exception):
    pass


class _Context:
    """What json.decoder.JSONDecoder gives the C scanner (json.scanner.c_make_scanner)."""

    def __init__(self, parse_float, parse_constant):
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = parse_float or float
        self.parse_int = int
        self.parse_constant = parse_constant or _CONSTANTS.__getitem__
        self.memo = {}


_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


def _text(data):
    """str as json.loads makes it from `data`, or _Fallback where json has more to say."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise _Fallback
        return data
    if not isinstance(data, (bytes, bytearray)) or data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")) \
            or 0 in data[:4]:
        raise _Fallback  # json.detect_encoding would pick a UTF-16/32 or BOM-aware codec
    return data.decode("utf-8", "surrogatepass")


def _skip(text: str, pos: int) -> int:
    end = len(text)
    while pos < end and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def loads(data, *, parse_float=None, parse_constant=None):
    """json.loads(data, parse_float=parse_float, parse_constant=parse_constant)."""
    if _json is not None:
        try:
            text = _text(data)
            scan = _json.make_scanner(_Context(parse_float, parse_constant))
            obj, end = scan(text, _skip(text, 0))
            if _skip(text, end) == len(text):
                return obj
        except Exception:
            pass  # json raises it again, as json raises it
    import json
    return json.loads(data, parse_float=parse_float, parse_constant=parse_constant)


def load_leading(data, names) -> dict | None:
    """The members `names` of the JSON object `data`, parsed from its start and no further than the
    last of them to appear: a large member written after them is never parsed. Names the object does
    not hold are absent. None when `data` is not read so far as a well-formed object (the caller
    then reads it whole, with json's errors); for an object with a key twice, the first is taken."""
    if _json is None:
        return None
    try:
        text = _text(data)
        scan = _json.make_scanner(_Context(None, None))
        wanted, found = set(names), {}
        pos = _skip(text, 0)
        if text[pos] != "{":
            return None
        pos = _skip(text, pos + 1)
        if text[pos] == "}":
            return found
        while wanted:
            if text[pos] != '"':
                return None
            key, pos = _json.scanstring(text, pos + 1, True)
            pos = _skip(text, pos)
            if text[pos] != ":":
                return None
            value, pos = scan(text, _skip(text, pos + 1))
            if key in wanted:
                wanted.discard(key)
                found[key] = value
            pos = _skip(text, pos)
            if text[pos] == "}":
                break
            if text[pos] != ",":
                return None
            pos = _skip(text, pos + 1)
        return found
    except Exception:
        return None


def _no_default(obj):
    raise _Fallback


def dumps(obj, *, indent=None, separators=None, sort_keys=False, default=None) -> str:
    """json.dumps(obj, indent=..., separators=..., sort_keys=..., default=...), ensure_ascii."""
    if _json is not None:
        try:
            if isinstance(obj, str):  # as json.JSONEncoder.encode
                return _json.encode_basestring_ascii(obj)
            if indent is None:
                item_sep, key_sep = separators or (", ", ": ")
                encode = _json.make_encoder({}, default or _no_default, _json.encode_basestring_ascii, None,
                                            key_sep, item_sep, sort_keys, False, True)
                return "".join(encode(obj, 0))
            if type(indent) is int and separators is None and not sort_keys:
                out: list[str] = []
                _pretty(obj, " " * indent, "\n", out, 0)
                return "".join(out)
        except Exception:
            pass
    import json
    return json.dumps(obj, indent=indent, separators=separators, sort_keys=sort_keys, default=default)


def _pretty(obj, indent: str, newline: str, out: list, depth: int) -> None:
    """json's indented encoder (json.encoder._make_iterencode, item separator ',', key separator
    ': ') for dict, list, str, int, bool and None; anything else is json's to do."""
    if depth > 100:
        raise _Fallback
    kind = type(obj)
    if kind is str:
        out.append(_json.encode_basestring_ascii(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif kind is int:
        out.append(int.__repr__(obj))
    elif kind is dict:
        if not obj:
            out.append("{}")
            return
        inner = newline + indent
        out.append("{")
        first = True
        for key, value in obj.items():
            if type(key) is not str:
                raise _Fallback
            out.append(inner if first else "," + inner)
            first = False
            out.append(_json.encode_basestring_ascii(key))
            out.append(": ")
            _pretty(value, indent, inner, out, depth + 1)
        out.append(newline)
        out.append("}")
    elif kind is list:
        if not obj:
            out.append("[]")
            return
        inner = newline + indent
        out.append("[")
        first = True
        for value in obj:
            out.append(inner if first else "," + inner)
            first = False
            _pretty(value, indent, inner, out, depth + 1)
        out.append(newline)
        out.append("]")
    else:
        raise _Fallback
