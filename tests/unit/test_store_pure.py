"""Pure parts of the manifest store: the streaming diff merge and name/ref rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datasync.errors import UnknownReference, UserError
from datasync.manifest.diff import merge_changes
from datasync.manifest.refs import check_dataset_name, check_label, parse_ref

Rows = dict[str, tuple[int, str]]
paths = st.text(alphabet="ab/é😀.", min_size=1, max_size=4)
manifests = st.dictionaries(paths, st.tuples(st.integers(0, 3), st.sampled_from("xyz")))


def ordered(m: Rows) -> list[tuple[str, int, str]]:
    return [(p, *m[p]) for p in sorted(m, key=lambda p: p.encode("utf-8"))]


@given(manifests, manifests)
def test_merge_equals_the_dictionary_answer(old: Rows, new: Rows) -> None:
    changes = list(merge_changes(ordered(old), ordered(new)))
    assert {c.path for c in changes if c.kind == "added"} == new.keys() - old.keys()
    assert {c.path for c in changes if c.kind == "removed"} == old.keys() - new.keys()
    assert {c.path for c in changes if c.kind == "changed"} == {
        p for p in old.keys() & new.keys() if old[p] != new[p]
    }
    emitted = [c.path.encode("utf-8") for c in changes]
    assert emitted == sorted(emitted)  # streamed in path order


def test_changed_entries_carry_both_sides() -> None:
    (c,) = merge_changes([("a", 1, "x")], [("a", 2, "y")])
    assert (c.kind, c.old_size, c.old_digest, c.new_size, c.new_digest) == (
        "changed",
        1,
        "x",
        2,
        "y",
    )


@pytest.mark.parametrize("name", ["drive", "drive/tokyo-urban", "a/b.c/d_e", "0/1/2"])
def test_good_dataset_names(name: str) -> None:
    assert check_dataset_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Drive", "a/b/c/d", "a//b", "/a", "a/", ".a", "a/..", "a b", "ä", "a@b"]
)
def test_bad_dataset_names(name: str) -> None:
    with pytest.raises(UserError, match="invalid dataset name"):
        check_dataset_name(name)


@pytest.mark.parametrize("name", ["ab" * 32, f"drive/{'0123456789abcdef' * 4}", f"x/y/{'f' * 64}"])
def test_a_dataset_segment_that_looks_like_a_version_id_is_refused(name: str) -> None:
    """Views live at <root>/<dataset>/<version-id>/: such a segment would collide."""
    with pytest.raises(UserError, match=r"64 hex digits.*collide with a version directory"):
        check_dataset_name(name)
    # One digit fewer or one non-hex letter is an ordinary name.
    assert check_dataset_name(name[:-1]) == name[:-1]
    assert check_dataset_name(name[:-1] + "g") == name[:-1] + "g"


def test_labels_may_not_look_like_full_ids() -> None:
    assert check_label("v3") == "v3" and check_label("2026-11-20") == "2026-11-20"
    with pytest.raises(UserError):
        check_label("a" * 64)


def test_parse_ref() -> None:
    assert str(parse_ref("drive/x")) == "drive/x@latest"
    assert parse_ref("drive/x@v3").ref == "v3"
    with pytest.raises(UnknownReference):
        parse_ref("drive/x@")
    with pytest.raises(UnknownReference):
        parse_ref("drive/x@a b")
