"""Read an HTTP response body straight into a caller's buffer (S3, Azure and GCS reads).

urllib3's ``HTTPResponse.readinto`` reads into a temporary ``bytes`` and copies it, and
the SDKs read bodies in blocks that they join: two or three copies of every byte under the
GIL, which capped our ranged downloads at a third of rclone's. ``http.client``'s own
``readinto`` goes down to ``socket.recv_into`` on the caller's memory, so a range lands in
its pooled buffer with no copy at all.

The connection goes back to the pool only after the body was read to its end; a short or
failed read closes it (a half-read connection must never carry the next request). A body
shorter than its Content-Length raises urllib3's ``ProtocolError``, as urllib3 itself
would: the backends' translators make it a retryable network error.
"""

from __future__ import annotations

from typing import Any, Protocol

from urllib3.exceptions import ProtocolError

__all__ = ["read_body_into", "read_range_by_into"]


def read_body_into(raw: Any, view: memoryview) -> int:
    """Fill ``view`` from the urllib3 response ``raw`` (decoded bytes are never wanted: the
    stored bytes are the content); return the byte count, short only at the body's end.

    The body must not be longer than ``view`` (a ranged GET answered with its range); a
    longer body is read no further and its connection is closed.
    """
    fp = getattr(raw, "_fp", None)
    got = 0
    try:
        if fp is None:  # not urllib3 over http.client: one copy, still correct
            data = raw.read(len(view))
            view[: len(data)] = data
            got = len(data)
        else:
            while got < len(view):
                n = fp.readinto(view[got:])
                if not n:
                    break
                got += n
            if fp.length:  # http.client returns 0, not an error, when the peer hangs up
                raise ProtocolError(f"body cut short: {fp.length} of its bytes never came")
        done = fp is None or fp.fp is None or fp.isclosed()
    except BaseException:
        raw.close()
        raise
    if done:
        raw.release_conn()
    else:
        raw.close()
    return got


class _ReadsInto(Protocol):
    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int: ...


def read_range_by_into(
    backend: _ReadsInto, key: str, offset: int, length: int, etag: str | None
) -> bytes:
    """``Backend.read_range`` for a backend whose ``read_range_into`` is the real read."""
    if offset < 0 or length < 0:
        raise ValueError(f"bad range offset={offset} length={length}")
    buf = bytearray(length)
    got = backend.read_range_into(key, offset, buf, etag=etag)
    return bytes(buf) if got == length else bytes(memoryview(buf)[:got])
