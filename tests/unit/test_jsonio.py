"""cnicore.jsonio gives what json gives: the same objects, the same text, the same errors."""

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from cnicore import jsonio

scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.text() | \
    st.floats(allow_nan=True, allow_infinity=True)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) |
                         st.dictionaries(st.text() | st.integers() | st.booleans() | st.none(), inner, max_size=4),
                         max_leaves=25)
plain = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                     max_leaves=25)


def outcome(fn, *args, **kwargs):
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # the type and the message must match
        return ("error", type(exc), str(exc))
    return ("ok", json.dumps(value, sort_keys=False, default=repr) if not isinstance(value, float) or not
            math.isnan(value) else "nan")


def strict_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def no_constant(name):
    raise ValueError(f"{name} is not JSON")


@settings(max_examples=400, deadline=None)
@given(documents, st.sampled_from([None, 0, 2, 4]), st.sampled_from([None, (",", ":"), (", ", ": ")]),
       st.booleans(), st.sampled_from([None, str]))
def test_dumps_is_json_dumps(doc, indent, separators, sort_keys, default):
    kwargs = dict(indent=indent, separators=separators, sort_keys=sort_keys, default=default)
    assert outcome(jsonio.dumps, doc, **kwargs) == outcome(json.dumps, doc, **kwargs)


@settings(max_examples=300, deadline=None)
@given(plain)
def test_indented_dumps_of_plain_documents_is_json_dumps(doc):
    assert jsonio.dumps(doc, indent=4) == json.dumps(doc, indent=4)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_loads_of_dumped_documents_is_json_loads(doc):
    try:
        text = json.dumps(doc)
    except (TypeError, ValueError):
        return
    for data in (text, text.encode(), f" \n{text}\t ".encode(), text.encode() + b"x", b"\xef\xbb\xbf" + text.encode()):
        for kwargs in ({}, {"parse_float": strict_float, "parse_constant": no_constant}):
            assert outcome(jsonio.loads, data, **kwargs) == outcome(json.loads, data, **kwargs)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40) | st.text(max_size=30).map(lambda t: t.encode("utf-16")) |
       st.sampled_from([b"", b" ", b"{}", b"[1,2", b'{"a":NaN}', b"Infinity", b"-Infinity", b"1e999", b"1.5",
                        b'"\\ud800"', b'{"a": 1} {"b": 2}', b"\x00{}", b"[" * 5000, b'"\xff"', "\ufeff{}", b"nul"]))
def test_loads_of_any_input_is_json_loads(data):
    for kwargs in ({}, {"parse_float": strict_float, "parse_constant": no_constant}):
        assert outcome(jsonio.loads, data, **kwargs) == outcome(json.loads, data, **kwargs)


def test_circular_and_unserialisable_objects_raise_what_json_raises():
    loop = []
    loop.append(loop)
    for obj in (loop, {"a": object()}, {(1, 2): 3}):
        for kwargs in ({}, {"indent": 4}, {"separators": (",", ":"), "sort_keys": True}):
            assert outcome(jsonio.dumps, obj, **kwargs) == outcome(json.dumps, obj, **kwargs)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=4), plain, max_size=6), st.lists(st.text(max_size=4), max_size=3),
       st.sampled_from([(",", ":"), (", ", ": ")]), st.integers(min_value=0, max_value=40))
def test_load_leading_gives_the_named_members_json_loads_gives(doc, names, separators, cut):
    text = json.dumps(doc, separators=separators)
    assert jsonio.load_leading(text.encode(), names) == {k: v for k, v in doc.items() if k in names}
    # a document cut short or spoiled: the members read are right, or it says None (read it all)
    for broken in (text[:cut], text[:cut] + "}", text.replace(":", "=", 1)):
        found = jsonio.load_leading(broken, names)
        assert found is None or all(doc.get(k) == v for k, v in found.items())


def test_load_leading_reads_no_further_than_the_last_named_member():
    # what follows the named members is not parsed: here it is not even JSON
    assert jsonio.load_leading(b'{"network":"n","node":{"a":[1]},"enis":{not json', ("network", "node")) == \
        {"network": "n", "node": {"a": [1]}}
    assert jsonio.load_leading(b'{"enis":{not json},"node":1}', ("node",)) is None
    assert jsonio.load_leading(b'[1, 2]', ("node",)) is None
    assert jsonio.load_leading(b' { } ', ("node",)) == {}
