"""The safe group-size parser: every accepted form, and a clear error for each malformed one."""

from __future__ import annotations

import pytest

from lpd.schedules import GroupSizeError, parse_group_sizes, validate_group_sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1]*4", [1, 1, 1, 1]),
        ("[1, 2, 4]", [1, 2, 4]),
        ("1,2,4", [1, 2, 4]),
        (" 1, 2 ,4 ", [1, 2, 4]),
        ("[1*2, 3*2]", [1, 1, 3, 3]),
        ("[1]*2 + [2]*3", [1, 1, 2, 2, 2]),
        ("[1, 2]*2", [1, 2, 1, 2]),
        ("7", [7]),
    ],
)
def test_accepted_forms(text, expected):
    assert parse_group_sizes(text) == expected


def test_released_256_step_string():
    assert parse_group_sizes("[1]*256", 256) == [1] * 256


def test_sequences_pass_through_validation():
    import numpy as np

    assert parse_group_sizes([1, 2, 3], 6) == [1, 2, 3]
    assert parse_group_sizes(np.array([1, 2, 3]), 6) == [1, 2, 3]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty string"),
        ("1,,2", "empty entry"),
        ("[1, -2]", "cannot read"),
        ("[1, 2.5]", "cannot read"),
        ("__import__('os').system('ls')", "cannot read"),
        ("[1]*", "cannot read"),
        ("1,0,3", "at least one token"),
        ("abc", "cannot read"),
    ],
)
def test_malformed_strings(text, match):
    with pytest.raises(GroupSizeError, match=match):
        parse_group_sizes(text)


def test_wrong_sum_names_the_grid():
    with pytest.raises(GroupSizeError, match=r"sum to 6 but the token grid has 256 positions"):
        parse_group_sizes("1,2,3", 256)


def test_validate_rejects_non_integers_and_empty():
    with pytest.raises(GroupSizeError, match="entry 1 is 2.0, not an integer"):
        validate_group_sizes([1, 2.0])
    with pytest.raises(GroupSizeError, match="not an integer"):
        validate_group_sizes([True, 2])
    with pytest.raises(GroupSizeError, match="empty"):
        validate_group_sizes([])
    with pytest.raises(GroupSizeError, match="sequence of integers"):
        validate_group_sizes(5)


@pytest.mark.parametrize(
    "text", ["[1]*99999999999999", "1*70000", "[1*40000, 2*40000]", "[1, 2]*40000", "1*65536 + 1"]
)
def test_schedules_longer_than_any_grid_are_refused_before_expanding(text):
    with pytest.raises(GroupSizeError, match="expands to .* groups, more than the 65536"):
        parse_group_sizes(text)
    assert len(parse_group_sizes("[1]*65536")) == 65536  # a 256 x 256 grid, one token per step
