#!/usr/bin/env python3
"""extract-vmlinux.py BZIMAGE OUT: writes the ELF vmlinux compressed inside a bzImage.

Looks for each known compression magic in the image, decompresses from there (trailing data
after the stream is ignored) and keeps the first result that is an ELF file. gzip, xz, lzma and
bzip2 use Python's standard library; zstd and lz4 use the zstd/lz4 tools when installed.
"""
import bz2, lzma, subprocess, sys, zlib

MAGICS = [
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("bzip2", b"BZh"),
    ("lz4", b"\x02\x21\x4c\x18"),
]


def decompress(kind, data):
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind in ("xz", "lzma"):
            fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
            return lzma.LZMADecompressor(format=fmt).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
        tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}[kind]
        r = subprocess.run(tool, input=data, capture_output=True)
        return r.stdout
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
        return b""


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data = open(sys.argv[1], "rb").read()
    for kind, magic in MAGICS:
        start = 0
        while (i := data.find(magic, start)) >= 0:
            out = decompress(kind, data[i:])
            if out[:4] == b"\x7fELF":
                with open(sys.argv[2], "wb") as f:
                    f.write(out)
                print(f"extract-vmlinux: {kind} stream at offset {i}: {len(out)} bytes")
                return
            start = i + 1
    sys.exit(f"extract-vmlinux: no compressed ELF kernel found in {sys.argv[1]}")


main()
