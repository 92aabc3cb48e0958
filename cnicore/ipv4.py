"""IPv4 text read without `ipaddress`: with functools and collections it is ~3 ms of a plugin exec.

Only the form every result, store and IMDS answer holds is read here ("a.b.c.d", "a.b.c.d/n":
decimal, no leading zeros, as ipaddress writes them); anything else goes to ipaddress: by the caller
(`plain`, `plain_cidr`, `plain_network`), or here (`address`, `network`: the values ipaddress gives,
and its ValueError for what it refuses).
"""

from __future__ import annotations


def plain(address: str) -> int | None:
    """The value of "a.b.c.d" written as ipaddress writes it, else None."""
    octets = address.split(".") if isinstance(address, str) else ()
    if len(octets) != 4 or not all(_decimal(o, 255) for o in octets):
        return None
    a, b, c, d = (int(o) for o in octets)
    return a << 24 | b << 16 | c << 8 | d


def plain_cidr(text: str) -> tuple[int, int] | None:
    """(address value, prefix length) of "a.b.c.d/n" written as ipaddress writes it, else None."""
    address, slash, prefix = text.partition("/") if isinstance(text, str) else ("", "", "")
    value = plain(address)
    if not slash or value is None or not _decimal(prefix, 32):
        return None
    return value, int(prefix)


def plain_network(text: str) -> bool:
    """Whether `text` is "a.b.c.d/n" as ipaddress writes an IPv4Network (no host bits set)."""
    found = plain_cidr(text)
    return found is not None and found[0] & ((1 << (32 - found[1])) - 1) == 0


def address(text) -> int:
    """The value of ipaddress.IPv4Address(text); ValueError if ipaddress refuses it."""
    value = plain(text)
    if value is None:
        import ipaddress
        value = int(ipaddress.IPv4Address(text))
    return value


def network(text) -> tuple[int, int]:
    """(network address value, prefix length) of ipaddress.IPv4Network(text) (strict: no host bits);
    ValueError if ipaddress refuses it."""
    if plain_network(text):
        return plain_cidr(text)
    import ipaddress
    net = ipaddress.IPv4Network(text)
    return int(net.network_address), net.prefixlen


def contains(net: tuple[int, int], value: int) -> bool:
    """Whether the address `value` is in the network `net` ((address value, prefix length))."""
    base, prefixlen = net
    return value >> (32 - prefixlen) == base >> (32 - prefixlen) if prefixlen else True


def text(value: int) -> str:
    """"a.b.c.d" of an address value, as ipaddress writes it."""
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def _decimal(text: str, top: int) -> bool:
    """A number as ipaddress reads it in an IPv4 address or prefix: 1-3 ASCII digits, no leading zero."""
    return (0 < len(text) <= 3 and text.isascii() and text.isdigit() and (text[0] != "0" or text == "0")
            and int(text) <= top)
