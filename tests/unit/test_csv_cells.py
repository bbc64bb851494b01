"""The one CSV writer: text a spreadsheet would evaluate is written as text (OWASP)."""

from __future__ import annotations

import csv
import io

import pytest

from face_emotions.ops.csv_cells import csv_writer
from face_emotions.ops.csv_cells import spreadsheet_cell


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("=1+1", "'=1+1"),
        ('=HYPERLINK("http://evil/","x")', '\'=HYPERLINK("http://evil/","x")'),
        ("+1", "'+1"),
        ("-1+2", "'-1+2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("a=1.png", "a=1.png"),
        ("'quoted", "'quoted"),
        ("", ""),
        (-3, -3),
        (-0.5, -0.5),
        (None, None),
        (True, True),
    ],
)
def test_spreadsheet_cell(value: object, written: object) -> None:
    assert spreadsheet_cell(value) == written


def test_csv_writer_neutralises_every_cell_and_keeps_numbers() -> None:
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(["=cmd|' /C calc'!A0", -4, 0.25, None, "Happy"])
    writer.writerows([["@x", "-"], ["ok", "+"]])
    rows = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert rows == [
        ["'=cmd|' /C calc'!A0", "-4", "0.25", "", "Happy"],
        ["'@x", "'-"],
        ["ok", "'+"],
    ]
