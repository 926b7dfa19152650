"""``backends/crc32c.py``: CRC32C of concatenations from part CRCs, as GCS composes them."""

from __future__ import annotations

import base64
import random

import google_crc32c
import pytest

from datasync.backends.crc32c import crc32c_b64, crc32c_concat, crc32c_of


@pytest.mark.parametrize("lengths", [[], [0], [1], [5, 0, 7], [1000, 65_536, 3], [1 << 20] * 3])
def test_concat_equals_the_crc_of_the_joined_bytes(lengths: list[int]) -> None:
    rng = random.Random(len(lengths))
    parts = [rng.randbytes(n) for n in lengths]
    joined = b"".join(parts)
    assert crc32c_of(joined) == google_crc32c.value(joined)
    assert crc32c_concat([(crc32c_of(p), len(p)) for p in parts]) == crc32c_of(joined)


def test_order_matters_and_the_wire_form_is_gcs_base64() -> None:
    a, b = b"abc" * 100, b"xyz" * 7
    ab = crc32c_concat([(crc32c_of(a), len(a)), (crc32c_of(b), len(b))])
    ba = crc32c_concat([(crc32c_of(b), len(b)), (crc32c_of(a), len(a))])
    assert ab != ba
    wire = base64.b64encode(google_crc32c.value(b"hello").to_bytes(4, "big")).decode()
    assert crc32c_b64(crc32c_of(b"hello")) == wire  # the object resource's "crc32c" field
