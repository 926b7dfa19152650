"""``RetryingBackend``: every call of a site's backend under the one ``RetryPolicy``.

The engine wraps each site's backend once; nothing else retries backend calls (the SDKs'
own retries are off, so this layer sees every throttling answer).

* Retried: reads, ``stat``, ``list`` (a stream resumed after the last key it yielded),
  ``begin``, ``put_part``, ``durable_parts``, ``commit`` (writers' commits are safe to
  repeat, see ``base.py``), ``abort``, ``delete``, ``copy``, ``link`` and the idempotent
  local-tree operations. Called once (not idempotent, and local: nothing to gain):
  ``rename``, ``link_new``, ``rename_tree``, ``exchange``, a group's ``stage`` and
  ``commit_all``, and ``put_small`` (a batch reports its items' errors in its result, and
  a repeated flush after a failed one proves nothing; its hooks run once per batch).
* Hooks, for the engine's AIMD limits and metrics, know nothing of sites (the engine binds
  the site when it builds the wrapper): ``on_throttled(error)`` for every ``Throttled``
  answer, retried or not; ``on_success()`` after every successful call (a listing: once,
  at its end); ``on_retry(RetryEvent)`` before every sleep.
* Optional protocols are forwarded exactly when the wrapped backend has them: the class
  of the wrapper is chosen per wrapped backend, so ``isinstance(wrapper,
  SupportsLocalTree)`` agrees with ``wrapper.capabilities.local_tree`` as it does on the
  wrapped backend. Callers should test the capability flags; ``unwrap()`` returns the
  wrapped backend for backend-specific calls (``PosixBackend.partial_uploads``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from datasync.backends.base import (
    Backend,
    Capabilities,
    GroupCommit,
    ObjectInfo,
    SmallPut,
    SupportsGroupCommit,
    SupportsLink,
    SupportsLocalTree,
    SupportsPartProofs,
    SupportsPutSmall,
    SupportsReadInto,
    SupportsRename,
    Writer,
)
from datasync.errors import Throttled
from datasync.retry import RetryEvent, RetryPolicy

__all__ = ["RetryingBackend", "RetryingWriter"]

P = ParamSpec("P")
T = TypeVar("T")


class RetryingBackend:
    """``inner`` with every call under ``policy``; see the module docstring."""

    def __new__(
        cls,
        inner: Backend,
        policy: RetryPolicy,
        *,
        on_throttled: Callable[[Throttled], None] | None = None,
        on_success: Callable[[], None] | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> RetryingBackend:
        if cls is RetryingBackend:
            cls = _class_for(
                tuple(mixin for proto, mixin in _OPTIONAL.items() if isinstance(inner, proto))
            )
        return object.__new__(cls)

    def __init__(
        self,
        inner: Backend,
        policy: RetryPolicy,
        *,
        on_throttled: Callable[[Throttled], None] | None = None,
        on_success: Callable[[], None] | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ) -> None:
        if isinstance(inner, RetryingBackend):
            raise ValueError(f"{inner.url} is already wrapped (retries would multiply)")
        self._inner = inner
        self._policy = policy
        self._on_throttled = on_throttled
        self._on_success = on_success
        self._on_retry = on_retry

    def unwrap(self) -> Backend:
        return self._inner

    def __repr__(self) -> str:
        return f"RetryingBackend({self._inner!r})"

    # -- Backend --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def capabilities(self) -> Capabilities:
        return self._inner.capabilities

    def stat(self, key: str) -> ObjectInfo:
        return self._call(self._inner.stat, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The inner listing; after a retryable error it is listed again and resumed after
        the last key yielded (listings are in ascending key order)."""
        last: str | None = None
        current: Iterator[ObjectInfo] | None = None

        def next_info() -> ObjectInfo | None:
            nonlocal current
            try:
                if current is None:
                    current = iter(self._inner.list(prefix))
                for info in current:
                    if last is None or info.key > last:
                        return info
                return None
            except BaseException:
                _close(current)
                current = None
                raise

        try:
            # Success is reported once, at the end, not per key.
            while info := self._retried(functools.partial(self._attempt, next_info, False)):
                last = info.key
                yield info
        finally:
            _close(current)
        if self._on_success is not None:
            self._on_success()

    def read_range(self, key: str, offset: int, length: int, *, etag: str | None = None) -> bytes:
        return self._call(self._inner.read_range, key, offset, length, etag=etag)

    def begin(
        self, key: str, size: int, part_size: int, *, token: str | None = None
    ) -> RetryingWriter:
        writer = self._call(self._inner.begin, key, size, part_size, token=token)
        return RetryingWriter(writer, self)

    def delete(self, key: str) -> None:
        self._call(self._inner.delete, key)

    def copy(self, src_key: str, dst_key: str, *, source: ObjectInfo | None = None) -> ObjectInfo:
        return self._call(self._inner.copy, src_key, dst_key, source=source)

    def close(self) -> None:
        self._inner.close()

    # -- plumbing -------------------------------------------------------------------------

    def _call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` retried under the policy, every attempt reported."""
        return self._retried(functools.partial(self._attempt, fn, True, *args, **kwargs))

    def _retried(self, fn: Callable[[], T]) -> T:
        return self._policy.run(fn, on_retry=self._on_retry)

    def _once(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` reported but not retried."""
        return self._attempt(fn, True, *args, **kwargs)

    def _attempt(self, fn: Callable[P, T], report: bool, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            result = fn(*args, **kwargs)
        except Throttled as exc:
            if self._on_throttled is not None:
                self._on_throttled(exc)
            raise
        if report and self._on_success is not None:
            self._on_success()
        return result


class RetryingWriter:
    """A writer whose part uploads, commit and abort are retried by its backend's policy."""

    def __init__(self, inner: Writer, backend: RetryingBackend) -> None:
        self._inner = inner
        self._b = backend

    def unwrap(self) -> Writer:
        return self._inner

    @property
    def token(self) -> str:
        return self._inner.token

    def put_part(self, index: int, data: bytes | memoryview) -> None:
        self._b._call(self._inner.put_part, index, data)

    def durable_parts(self) -> set[int]:
        return self._b._call(self._inner.durable_parts)

    def part_proof(self, index: int) -> str | None:
        inner = self._inner
        return inner.part_proof(index) if isinstance(inner, SupportsPartProofs) else None

    def accept_part_proofs(self, proofs: Mapping[int, str]) -> None:
        if isinstance(self._inner, SupportsPartProofs):
            self._inner.accept_part_proofs(proofs)

    def commit(self) -> ObjectInfo:
        return self._b._call(self._inner.commit)

    def abort(self) -> None:
        self._b._call(self._inner.abort)

    def close(self) -> None:
        self._inner.close()


class _RetryingGroup:
    """A group commit whose ``begin`` and writers are retried; ``stage`` and
    ``commit_all`` run once (a repeated flush after a failed one proves nothing)."""

    def __init__(self, inner: GroupCommit, backend: RetryingBackend) -> None:
        self._inner = inner
        self._b = backend

    def begin(self, key: str, size: int, part_size: int) -> RetryingWriter:
        return RetryingWriter(self._b._call(self._inner.begin, key, size, part_size), self._b)

    def stage(self, writer: Writer) -> None:
        inner = writer.unwrap() if isinstance(writer, RetryingWriter) else writer
        self._b._once(self._inner.stage, inner)

    def commit_all(self) -> Mapping[str, ObjectInfo]:
        return self._b._once(self._inner.commit_all)


# -- optional protocols: one mixin each, combined per wrapped backend ---------------------


class _ReadInto(RetryingBackend):
    def read_range_into(
        self, key: str, offset: int, buf: bytearray | memoryview, *, etag: str | None = None
    ) -> int:
        inner = cast(SupportsReadInto, self._inner)
        return self._call(inner.read_range_into, key, offset, buf, etag=etag)


class _Rename(RetryingBackend):
    def rename(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self._once(cast(SupportsRename, self._inner).rename, src_key, dst_key)


class _Link(RetryingBackend):
    def link(self, src_key: str, dst_key: str) -> ObjectInfo:
        return self._call(cast(SupportsLink, self._inner).link, src_key, dst_key)


class _GroupCommit(RetryingBackend):
    def group_commit(self) -> GroupCommit:
        return _RetryingGroup(cast(SupportsGroupCommit, self._inner).group_commit(), self)


class _PutSmall(RetryingBackend):
    def put_small(
        self, items: Sequence[tuple[str, bytes | memoryview]]
    ) -> list[SmallPut | Exception]:
        return self._once(cast(SupportsPutSmall, self._inner).put_small, items)


class _LocalTree(RetryingBackend):
    @property
    def _tree(self) -> SupportsLocalTree:
        return cast(SupportsLocalTree, self._inner)

    @property
    def root(self) -> str:
        return self._tree.root

    def make_durable(self, key: str) -> None:
        self._call(self._tree.make_durable, key)

    def make_dirs(self, key: str) -> None:
        self._call(self._tree.make_dirs, key)

    def is_dir(self, key: str) -> bool:
        return self._call(self._tree.is_dir, key)

    def list_dir(self, key: str) -> list[str]:
        return self._call(self._tree.list_dir, key)

    def link_new(self, src_key: str, dst_key: str, *, expect_digest: str) -> bool:
        return self._once(self._tree.link_new, src_key, dst_key, expect_digest=expect_digest)

    def link_many(self, links: Sequence[tuple[str, str]]) -> list[ObjectInfo | None]:
        return self._once(self._tree.link_many, links)

    def sync_tree(self, prefix_key: str) -> None:
        self._call(self._tree.sync_tree, prefix_key)

    def rename_tree(self, src_key: str, dst_key: str) -> None:
        self._once(self._tree.rename_tree, src_key, dst_key)

    def exchange(self, a_key: str, b_key: str) -> bool:
        return self._once(self._tree.exchange, a_key, b_key)

    def set_symlink(self, key: str, target: str) -> None:
        self._call(self._tree.set_symlink, key, target)

    def remove_symlink(self, key: str) -> None:
        self._call(self._tree.remove_symlink, key)

    def read_symlink(self, key: str) -> str | None:
        return self._call(self._tree.read_symlink, key)

    def remove_tree(self, prefix_key: str) -> None:
        self._call(self._tree.remove_tree, prefix_key)

    def set_tree_readonly(self, prefix_key: str, readonly: bool) -> None:
        self._call(self._tree.set_tree_readonly, prefix_key, readonly)


_OPTIONAL: dict[Any, type[RetryingBackend]] = {
    SupportsReadInto: _ReadInto,
    SupportsRename: _Rename,
    SupportsLink: _Link,
    SupportsGroupCommit: _GroupCommit,
    SupportsLocalTree: _LocalTree,
    SupportsPutSmall: _PutSmall,
}


@functools.cache
def _class_for(mixins: tuple[type[RetryingBackend], ...]) -> type[RetryingBackend]:
    """The wrapper class with exactly these optional protocols (one class per set)."""
    if not mixins:
        return RetryingBackend
    return type("RetryingBackend", mixins, {"__module__": __name__})


def _close(it: Iterator[ObjectInfo] | None) -> None:
    if isinstance(it, Generator):
        it.close()
