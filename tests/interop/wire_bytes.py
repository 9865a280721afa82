"""Protobuf wire bytes built by hand, for tests of code that reads them without parsing."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """`value` as a base-128 varint; negative int32/int64 values as their 10-byte two's
    complement, as protobuf sends them."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
