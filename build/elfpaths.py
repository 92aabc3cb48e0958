"""Point the RUNPATH/RPATH of every ELF file in the bundle into the bundle itself, in place.

    python build/elfpaths.py BUNDLE_INTERNAL_DIR        (rewrite; prints what it changed)
    python build/elfpaths.py --check BUNDLE_INTERNAL_DIR (exit 1 if any path leaves the bundle)

PyInstaller copies libpython, the extension modules and their libraries as they are, so they keep
the build machine's RUNPATH (here /root/.pyenv/versions/3.11.7/lib) and find the bundled libffi,
libssl, libz, ... only through the LD_LIBRARY_PATH its bootloader sets and re-execs itself for. Our
launcher (build/launcher.c) runs in one process without LD_LIBRARY_PATH, so each such path becomes
`$ORIGIN/<relative path to _internal>`. A file without RUNPATH needs nothing: the launcher's
DT_RPATH ($ORIGIN/_internal) covers the libraries it needs.

The new string is written over the old one in .dynstr, NUL-padded, so nothing moves; it must not
be longer than the old one, and the old one must not share bytes with another dynamic string (the
linker may merge a string into the tail of another). Both are checked; the build fails otherwise.
"""

import os
import struct
import sys

DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
PT_LOAD, PT_DYNAMIC = 1, 2
SHT_DYNSYM = 11


class ElfError(Exception):
    pass


def _read_elf(data: bytes):
    """(dynamic entries as (file offset, tag, value), a vaddr->offset function, dynsym name offsets)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    (e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum, _) = struct.unpack_from(
        "<QQIHHHHHH", data, 0x20)
    loads, dynamic = [], None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)

    def offset(vaddr: int) -> int:
        for start, off, size in loads:
            if start <= vaddr < start + size:
                return off + vaddr - start
        raise ElfError(f"address {vaddr:#x} is in no loaded segment")

    entries = []
    if dynamic:
        for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            entries.append((pos, tag, value))
    names = []
    for i in range(e_shnum if e_shoff else 0):
        _, sh_type, _, _, sh_offset, sh_size, _, _, _, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        if sh_type == SHT_DYNSYM and sh_entsize:
            names += [struct.unpack_from("<I", data, sh_offset + j)[0] for j in range(0, sh_size, sh_entsize)]
    return entries, offset, names


def search_paths(path: str) -> list[str]:
    """The file's RPATH and RUNPATH strings."""
    with open(path, "rb") as f:
        data = f.read()
    entries, offset, _ = _read_elf(data)
    strtab = next(offset(v) for _, t, v in entries if t == DT_STRTAB) if entries else 0
    out = []
    for _, tag, value in entries:
        if tag in (DT_RPATH, DT_RUNPATH):
            start = strtab + value
            out.append(data[start:data.index(b"\0", start)].decode())
    return out


def rewrite(path: str, new: str) -> list[str]:
    """Replace the file's RPATH/RUNPATH strings by `new`; return the old ones (none: untouched)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    entries, offset, names = _read_elf(bytes(data))
    targets = [v for _, t, v in entries if t in (DT_RPATH, DT_RUNPATH)]
    if not targets:
        return []
    strtab = offset(next(v for _, t, v in entries if t == DT_STRTAB))
    others = [v for _, t, v in entries if t in (DT_NEEDED, DT_SONAME)] + names
    old_paths = []
    for value in targets:
        start = strtab + value
        end = data.index(b"\0", start)
        old = data[start:end].decode()
        old_paths.append(old)
        if old == new:
            continue
        if len(new) > len(old):
            raise ElfError(f"{path}: {new!r} does not fit in place of {old!r}")
        if any(value <= o <= value + len(old) for o in others if o not in targets):
            raise ElfError(f"{path}: the string {old!r} is shared with another dynamic string")
        data[start:end] = new.encode().ljust(end - start, b"\0")
    tmp = f"{path}.elfpaths-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
    return old_paths


def _elf_files(top: str):
    for root, _, files in os.walk(top):
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def _inside(top: str, elf: str) -> str:
    """$ORIGIN-relative path from the file's folder to `top`."""
    rel = os.path.relpath(top, os.path.dirname(elf))
    return "$ORIGIN" if rel == "." else f"$ORIGIN/{rel}"


def main(argv: list[str]) -> int:
    check = argv[:1] == ["--check"]
    top = os.path.abspath(argv[-1])
    bad = 0
    for elf in _elf_files(top):
        if check:
            for p in search_paths(elf):
                for entry in p.split(":"):
                    resolved = os.path.normpath(entry.replace("$ORIGIN", os.path.dirname(elf)))
                    if not (resolved == top or resolved.startswith(top + os.sep)):
                        print(f"{os.path.relpath(elf, top)}: search path {entry!r} leaves the bundle")
                        bad += 1
        else:
            old = rewrite(elf, _inside(top, elf))
            if old:
                print(f"{os.path.relpath(elf, top)}: {':'.join(old)} -> {_inside(top, elf)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
