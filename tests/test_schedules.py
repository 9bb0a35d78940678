"""Group-size schedules: the released tables, the cosine fallback, the training lists."""

from __future__ import annotations

import numpy as np
import pytest

from lpd.schedules import (
    RELEASED_GROUP_SIZES,
    GroupSizeError,
    cosine_group_sizes,
    group_sizes,
    num_tokens,
    scaled_group_sizes,
    training_schedules,
)


def _valid(sizes, n, steps):
    assert len(sizes) == steps
    assert sum(sizes) == n
    assert all(isinstance(g, int) and g >= 1 for g in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:])), "non-decreasing"


@pytest.mark.parametrize("n", sorted(RELEASED_GROUP_SIZES))
def test_every_released_table_sums_to_n_and_has_its_step_count(n):
    for steps, sizes in RELEASED_GROUP_SIZES[n].items():
        assert sum(sizes) == n, (n, steps)
        assert len(sizes) == steps, (n, steps)
        assert sizes[0] == 1
        assert all(g >= 1 for g in sizes)


def test_released_table_counts():
    assert sorted(RELEASED_GROUP_SIZES[256]) == [8, 12, 16, 20, 24, 32, 64, 128, 256]
    assert sorted(RELEASED_GROUP_SIZES[1024]) == [
        32,
        40,
        48,
        56,
        64,
        80,
        96,
        128,
        160,
        192,
        224,
        256,
        512,
        1024,
    ]


def test_group_sizes_returns_the_released_tables():
    assert group_sizes(256, 20) == [
        1,
        2,
        4,
        5,
        7,
        8,
        10,
        11,
        12,
        14,
        15,
        16,
        17,
        18,
        18,
        19,
        19,
        20,
        20,
        20,
    ]
    assert group_sizes(256, 8) == [1, 15, 24, 32, 40, 45, 49, 50]
    assert group_sizes(256, 128) == [1] * 41 + [2] * 46 + [3] * 41
    assert group_sizes(256, 32)[:8] == [1, 1, 2, 2, 3, 3, 4, 5]
    t48 = group_sizes(512, 48)
    assert t48[:22] == list(range(1, 23))  # "1, 2, 3, ..., 22": each once
    tail = (
        [23, 23, 24, 25, 26, 26, 27, 28, 28, 29, 29, 30, 30, 31, 31, 32, 32, 32] + [33] * 7 + [34]
    )
    assert t48[22:] == tail
    assert group_sizes(512, 192)[-1] == 10
    assert group_sizes(512, 1024) == [1] * 1024
    # Keyed by the token grid: a 16 x 16 grid from another stride uses the same tables.
    assert group_sizes(128, 20, vqgan_stride=8) == group_sizes(256, 20)


@pytest.mark.parametrize(
    "img, steps",
    [
        (256, 10),
        (256, 1),
        (256, 2),
        (256, 255),
        (256, 100),
        (512, 20),
        (512, 47),
        (384, 30),
        (64, 7),
    ],
)
def test_group_sizes_fallback_is_valid(img, steps):
    n = num_tokens(img)
    sizes = group_sizes(img, steps)
    _valid(sizes, n, steps)
    if steps > 1:
        assert sizes[0] == 1
    else:
        assert sizes == [n]


def test_cosine_schedule_valid_for_every_step_count_on_small_grids():
    for n in (1, 4, 9, 16, 25, 64):
        for steps in range(1, n + 1):
            sizes = cosine_group_sizes(n, steps)
            _valid(sizes, n, steps)
            if steps > 1:
                assert sizes[0] == 1


def test_cosine_schedule_is_close_to_the_released_shape():
    # Not a copy of the released tables, but the same cosine shape.
    for n, tables in RELEASED_GROUP_SIZES.items():
        for steps, released in tables.items():
            ours = cosine_group_sizes(n, steps)
            assert max(abs(a - b) for a, b in zip(ours, released)) <= max(3, n // 100), (n, steps)


@pytest.mark.parametrize("steps", [0, -1, 257, 2.5, True])
def test_bad_step_counts(steps):
    with pytest.raises(GroupSizeError, match="step"):
        group_sizes(256, steps)


@pytest.mark.parametrize("img, stride", [(250, 16), (0, 16), (256, 0), (-256, 16)])
def test_bad_grids(img, stride):
    with pytest.raises(ValueError):
        group_sizes(img, 20, stride)


def test_scaled_group_sizes_of_the_whole_grid_are_the_released_tables():
    for n, tables in RELEASED_GROUP_SIZES.items():
        for steps, released in tables.items():
            assert scaled_group_sizes(n, steps, int(n**0.5) * 16) == list(released)


def test_scaled_group_sizes_by_hand():
    # 256 px / 8 steps, half the grid unknown: cumulative 1, 16, 40, 72, 112, 157, 206, 256 halved and rounded
    # (0.5 -> 0 raised to 1, 78.5 -> 78 rounding half to even).
    assert scaled_group_sizes(128, 8, 256) == [1, 7, 12, 16, 20, 22, 25, 25]
    assert scaled_group_sizes(20, 20, 256) == [1] * 20  # as many steps as positions
    assert scaled_group_sizes(100, 10, 256) == cosine_group_sizes(
        100, 10
    )  # no released 10-step table
    assert scaled_group_sizes(5, 1, 512) == [5]


@pytest.mark.parametrize("img, n", [(256, 256), (512, 1024)])
def test_scaled_group_sizes_are_valid_and_proportional(img, n):
    for steps, released in RELEASED_GROUP_SIZES[n].items():
        share = np.cumsum(released) / n
        for m in sorted({steps, steps + 1, n // 3, n // 2, n - 1} | set(range(steps, n, 97))):
            if not steps <= m <= n:
                continue
            sizes = scaled_group_sizes(m, steps, img)
            assert len(sizes) == steps and sum(sizes) == m and min(sizes) >= 1, (steps, m)
            if (
                steps <= 16 and m >= 64
            ):  # large groups: the cumulative shares up to rounding and a raised group
                assert np.abs(np.cumsum(sizes) - share * m).max() <= 1.0, (steps, m)


@pytest.mark.parametrize(
    "n_unknown, steps, match",
    [
        (128, 0, "--steps"),
        (128, 129, "--steps must be an integer between 1 and 128"),
        (128, 2.5, "--steps"),
        (0, 1, "unknown positions"),
        (257, 20, "1 to 256"),
        (True, 1, "unknown positions"),
    ],
)
def test_scaled_group_sizes_refuse_bad_counts(n_unknown, steps, match):
    with pytest.raises(GroupSizeError, match=match):
        scaled_group_sizes(n_unknown, steps, 256)


def test_training_schedules():
    s256 = training_schedules(256)
    assert len(s256) == 9
    assert all(sum(s) == 256 for s in s256)
    assert s256[0] == [1] * 256 and s256[-1] == [1, 15, 24, 32, 40, 45, 49, 50]
    s512 = training_schedules(512)
    assert len(s512) == 14
    assert all(sum(s) == 1024 for s in s512)
    # Lists are copies: changing one does not change the tables.
    s256[0][0] = 99
    assert training_schedules(256)[0][0] == 1
    with pytest.raises(ValueError, match="no released training schedules"):
        training_schedules(384)


@pytest.mark.parametrize("steps", [32, 48, 64, 96])
def test_4096_tokens_in_any_step_count(steps):
    sizes = group_sizes(1024, steps)
    _valid(sizes, 4096, steps)
    assert sizes[0] == 1 and sizes == cosine_group_sizes(4096, steps)
    # the cumulative share follows the cosine curve within a token or two
    j = np.arange(1, steps)
    c0 = np.cos(0.5 * np.pi / steps)
    want = 1 + (c0 - np.cos(0.5 * np.pi * (j + 1) / steps)) / c0 * (4096 - steps) + j
    assert np.abs(np.cumsum(sizes)[1:] - want).max() <= 2
    half = scaled_group_sizes(2048, steps, 1024)  # editing: half of the grid unknown
    assert len(half) == steps and sum(half) == 2048 and min(half) >= 1


def test_shipped_released_json_files_match_the_tables(tmp_path):
    import json
    import os

    from lpd.schedules import released_files
    from lpd.schedules.__main__ import write_released_files

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "orders")
    files = released_files()
    assert set(files) == {
        "group_sizes_lookup.json",
        "group_sizes_training/group_sizes_256.json",
        "group_sizes_training/group_sizes_512.json",
    }
    for rel, text in files.items():  # the repository copies are current
        with open(os.path.join(root, rel)) as f:
            assert f.read() == text, (
                f"orders/{rel} is stale: `python -m lpd.schedules write orders --overwrite`"
            )
    lookup = json.loads(files["group_sizes_lookup.json"])
    assert list(lookup) == ["256 resolution", "512 resolution"]
    assert list(lookup["256 resolution"]) == [
        f"{s} steps" for s in (256, 128, 64, 32, 24, 20, 16, 12, 8)
    ]
    for res, n in ((256, 256), (512, 1024)):
        for key, sizes in lookup[f"{res} resolution"].items():
            assert sizes == group_sizes(res, int(key.split()[0]))
            _valid(sizes, n, int(key.split()[0]))
        assert json.loads(
            files[f"group_sizes_training/group_sizes_{res}.json"]
        ) == training_schedules(res)
    # a few values as the released files print them
    assert lookup["256 resolution"]["8 steps"] == [1, 15, 24, 32, 40, 45, 49, 50]
    assert lookup["512 resolution"]["192 steps"][-2:] == [8, 10]
    written = write_released_files(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == sorted(files)
    assert all(open(p).read() == files[os.path.relpath(p, tmp_path)] for p in written)


def test_command_line_writes_only_where_asked_and_only_what_it_would_write(
    tmp_path, capsys, monkeypatch
):
    import os
    import subprocess
    import sys

    from lpd.schedules import released_files
    from lpd.schedules.__main__ import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    for argv in (["--help"], ["write", "--help"]):  # help is printed, nothing is created
        proc = subprocess.run(
            [sys.executable, "-m", "lpd.schedules", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (
            proc.returncode == 0
            and "usage: python -m lpd.schedules" in proc.stdout
            and not os.listdir(tmp_path)
        )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # no command: a usage error, nothing written
        main([])
    assert (
        e.value.code == 2
        and not os.listdir(tmp_path)
        and "required: command" in capsys.readouterr().err
    )
    assert (
        main(["show", "--steps", "8"]) == 0
        and capsys.readouterr().out == "[1, 15, 24, 32, 40, 45, 49, 50]\n"
    )
    assert main(["show", "--steps", "0"]) == 2 and capsys.readouterr().err.startswith(
        "error: cannot split 256"
    )
    assert main(["write", "out"]) == 0 and capsys.readouterr().out.count("wrote") == 3
    assert main(["write", "out"]) == 0 and "up to date" in capsys.readouterr().out
    edited = tmp_path / "out" / "group_sizes_lookup.json"
    edited.write_text("{}")
    assert (
        main(["write", "out"]) == 2
        and "differ(s) from the released tables" in capsys.readouterr().err
    )
    assert edited.read_text() == "{}"
    assert (
        main(["write", "out", "--overwrite"]) == 0
        and edited.read_text() == released_files()["group_sizes_lookup.json"]
    )
    (tmp_path / "file").write_text("x")
    assert main(["write", "file"]) == 2 and "is a file" in capsys.readouterr().err
