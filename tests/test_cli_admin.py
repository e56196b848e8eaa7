"""The admin commands' pure helpers: piece ranges and strips, and tables that fit the terminal."""

from __future__ import annotations

import io

from rich.console import Console

from dfzmq.cli_admin import _table, ranges, ranges_text, strip


def test_ranges_and_their_text():
    assert ranges([]) == [] and ranges_text([]) == "-"
    assert ranges([5, 0, 1, 2, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert ranges_text(ranges([0, 1, 2, 5, 7, 8])) == "0-2,5,7-8"
    many = ranges(list(range(0, 40, 2)))
    assert ranges_text(many, limit=3) == "0,2,4 (+17 more)"


def test_strip_cells_summarise_slices_of_the_pieces():
    assert strip(list(range(64)), 64, 8) == "█" * 8
    assert strip([], 64, 8) == "·" * 8
    assert strip(list(range(0, 64, 2)), 64, 8) == "▓" * 8  # half of each slice
    assert strip([0], 64, 8) == "▒" + "·" * 7
    assert strip([0, 1], 2, 32) == "██", "never more cells than pieces"
    assert strip([], -1) == "?"


def test_tables_drop_optional_columns_and_keep_numbers_whole():
    cols = [("host", "left", 0), ("location", "left", 100), ("served", "right", 0)]
    rows = [["a-very-long-hostname.with.many.labels.example.com", "eu|fr|paris", "123456789"]]

    def draw(width: int) -> str:
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None).print(_table("t", width, cols, rows))
        return buf.getvalue()

    narrow = draw(40)
    assert "location" not in narrow and "123456789" in narrow and "…" in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 40
    wide = draw(140)
    assert "eu|fr|paris" in wide and "a-very-long-hostname.with.many.labels.example.com" in wide
