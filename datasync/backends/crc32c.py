"""CRC32C of buffers and of concatenations, for checking what GCS computed.

GCS reports a CRC32C for every object, composites included (the server combines its
sources'), so a writer that knows the CRC32C and length of each part it sent can check
the composed object without reading it. ``crc32c_concat`` combines part CRCs the way
zlib's ``crc32_combine`` does: appending ``n`` zero bytes is a linear map over GF(2),
applied by repeated squaring of a 32x32 bit matrix, so no data is touched.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from awscrt import checksums  # type: ignore[import-untyped]  # takes views, releases the GIL

__all__ = ["crc32c_b64", "crc32c_concat", "crc32c_of"]

_POLY = 0x82F63B78  # Castagnoli, reflected


def crc32c_of(data: bytes | bytearray | memoryview) -> int:
    return int(checksums.crc32c(data))


def crc32c_b64(crc: int) -> str:
    """The form GCS reports: base64 of the big-endian 32-bit value."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, matrix[n]) for n in range(32)]


def _combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    odd = [_POLY] + [1 << n for n in range(31)]  # one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four zero bits
    while True:
        even = _square(odd)
        if len2 & 1:
            crc1 = _times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _square(even)
        if len2 & 1:
            crc1 = _times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def crc32c_concat(parts: Sequence[tuple[int, int]]) -> int:
    """The CRC32C of the concatenation of parts given as ``(crc32c, length)``, in order."""
    total = 0
    for crc, length in parts:
        total = _combine(total, crc, length)
    return total
