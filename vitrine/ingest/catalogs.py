"""Records from catalogs: CSV or JSONL rows of id, label and a url or a path.

The format comes from the file (`_sniffed`): .jsonl/.ndjson are JSON lines; .json is one JSON
array of rows when it starts with [, else JSON lines; .tsv/.tab are tab-separated; any other
file is delimited by whichever of , ; tab | its first line holds most. The columns id, label,
url and path are found whatever their case and surrounding spaces (`ID`, ` Label`). A catalog is
read as UTF-8, a leading byte-order mark dropped (Excel's "CSV UTF-8" writes one), or as UTF-16
when it starts with that byte-order mark (Excel's "Unicode text"), with undecodable bytes kept
aside (surrogate escapes) so that one bad byte costs only its own row. A line is read at most
MAX_ROW_CHARS characters at a time: the rest of a longer one is skipped, never held. Columns
other than id, label, url and path are the record's metadata. A path is relative to the
catalog's folder; a URL's body comes from the download cache, filled by collect before anything
is read.

Quarantine reasons decided here:

- bad_row: a JSONL line, or an element of a .json array, that is not JSON, or JSON but not an
  object ([1, 2], null, "text", 42); a .json file that is neither; a CSV row with more fields
  than the header, or one the csv module cannot parse (a field over its 128 KiB limit); a CSV
  row whose quote is never closed (the lines after it are then read as rows of their own, not
  as its text); a line, or a CSV row with its quoted line breaks, over MAX_ROW_CHARS
  characters; JSON nested deeper than MAX_DEPTH levels.
- invalid_utf8: a row holding text that is not valid UTF-8 (a byte that does not decode, such
  as one latin-1 byte in a UTF-8 file, or a lone surrogate escaped in JSON); the detail shows
  it with \\xNN escapes.
- missing_id: no id (the detail names the header's columns when it has no id column at all).
  duplicate_id: an id already seen in this catalog (the first one wins; the repeat is listed
  as `<id>#repeat-<k>`, see `vitrine.ingest.records.repeats_refused`).
- missing_location: neither a url nor a path (the columns named likewise when there are none).
- bad_url: a url that is not http(s) with a host (the downloader's own check).
- outside_source_root: a path leading out of the catalog's folder (.., an absolute path, a
  symbolic link).

A path is then read as any file is (unreadable, not_a_regular_file, too_large: see
`vitrine.ingest.records`), and a URL's failures are the downloader's (http_404, timeout,
blocked_address, ...: see `vitrine.ingest.download`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from vitrine.images import Rejected
from vitrine.ingest.download import FetchResult, url_problem
from vitrine.ingest.records import (
    InputRecord,
    escaped,
    is_valid_text,
    read_file_capped,
    reject,
    repeats_refused,
    within,
)

MAX_ROW_CHARS = 1 << 20  # a catalog line longer than this is one bad_row
MAX_DEPTH = 64  # JSON nesting a row may hold
_COLUMNS = ("id", "label", "url", "path")
_EOL = ("\n", "\r")

Row = dict[str, Any]
Problem = tuple[str, str] | None  # (reason, detail) of a row found bad while parsing


class _Lines:
    """A text stream's lines, each at most max_chars long: the rest of a longer line is read
    and dropped a chunk at a time, and `cut` is set until the reader resets it."""

    def __init__(self, f: TextIO, max_chars: int):
        self._f = f
        self._max = max_chars
        self.cut = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._f.readline(self._max + 1)
        if not line:
            raise StopIteration
        if len(line) > self._max and not line.endswith(_EOL):
            self.cut = True
            while (rest := self._f.readline(self._max)) and not rest.endswith(_EOL):
                pass
            line = line[: self._max] + "\n"
        return line

    def take_cut(self) -> bool:
        cut, self.cut = self.cut, False
        return cut


def _text_stream(
    binary: io.BufferedReader, newline: str | None, encoding: str = "utf-8-sig"
) -> io.TextIOWrapper:
    return io.TextIOWrapper(binary, encoding=encoding, errors="surrogateescape", newline=newline)


@dataclass(frozen=True)
class _Format:
    """How a catalog file is read: JSON lines, one JSON array of rows, or delimited text."""

    kind: str  # "jsonl" | "json_array" | "csv"
    encoding: str  # "utf-8-sig" (a leading byte-order mark dropped) or "utf-16"
    delimiter: str = ","


_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_TAB_SUFFIXES = (".tsv", ".tab")
_DELIMITERS = (",", ";", "\t", "|")  # the first line's most frequent one, ties to the earliest
_SNIFF_BYTES = 1 << 16


def _sniffed(path: Path) -> _Format:
    """The catalog's format, from its suffix and first bytes: .jsonl/.ndjson are JSON lines,
    .json a JSON array when it starts with [ (else JSON lines), .tsv/.tab tab-separated, and
    any other file delimited by whichever of , ; tab | its first line holds most. A UTF-16
    byte-order mark (Excel's "Unicode text") makes it UTF-16, else it is UTF-8."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))
    encoding = "utf-16" if utf16 else "utf-8-sig"
    text = head.decode(encoding, errors="replace") if len(head) % 2 == 0 or not utf16 else ""
    text = text.removeprefix("\ufeff")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _Format("jsonl", encoding)
    if suffix == ".json":
        return _Format("json_array" if text.lstrip().startswith("[") else "jsonl", encoding)
    if suffix in _TAB_SUFFIXES:
        return _Format("csv", encoding, "\t")
    first = text.splitlines()[0] if text else ""
    return _Format("csv", encoding, max(_DELIMITERS, key=first.count))


def _jsonl_rows(f: TextIO, max_chars: int) -> Iterator[tuple[Row, Problem]]:
    lines = _Lines(f, max_chars)
    for n, line in enumerate(lines, 1):
        cut = lines.take_cut()
        if not line.strip():
            continue
        here = {"id": f"line-{n}"}
        if cut:
            yield here, ("bad_row", f"line {n}: over {max_chars} characters")
        elif not is_valid_text(line):
            yield here, ("invalid_utf8", f"line {n}: {escaped(line.strip())[:200]}")
        else:
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as err:  # ValueError: an int of 5,000 digits
                yield here, ("bad_row", f"line {n}: invalid JSON: {err}")
                continue
            if isinstance(value, dict):
                yield value, None
            else:
                yield here, ("bad_row", f"line {n}: JSON {type(value).__name__}, not an object")


def _json_array_rows(f: TextIO) -> Iterator[tuple[Row, Problem]]:
    """The rows of a catalog that is one JSON array of objects (read whole: for catalogs of
    millions of rows, JSON lines stream instead)."""
    try:
        value = json.load(f)
    except (ValueError, RecursionError) as err:
        yield {"id": "file"}, ("bad_row", f"not one JSON array of rows: {err}")
        return
    if not isinstance(value, list):
        detail = f"a JSON {type(value).__name__}, not an array of rows"
        yield {"id": "file"}, ("bad_row", detail)
        return
    for n, item in enumerate(value, 1):
        if isinstance(item, dict):
            yield item, None
        else:
            detail = f"element {n}: JSON {type(item).__name__}, not an object"
            yield {"id": f"element-{n}"}, ("bad_row", detail)


def _quote_open_after(line: str, quoted: bool, delimiter: str = ",") -> bool:
    """Whether a quoted field is still open at the end of `line`, given whether one was open at
    its start: the csv module's own reading (a quote opens a field only at its start, `""`
    inside one is a quote, a quote anywhere else is a character, as in `15" screen`)."""
    if not quoted and '"' not in line:
        return False
    at_field_start, i = not quoted, 0
    while i < len(line):
        char = line[i]
        if quoted:
            if char == '"':
                if line.startswith('"', i + 1):
                    i += 1  # "" is a quote inside the field
                else:
                    quoted = False
        elif char == '"' and at_field_start:
            quoted = True
        at_field_start = char == delimiter and not quoted
        i += 1
    return quoted


def _csv_records(
    lines: _Lines, first_line: int, max_chars: int, delimiter: str
) -> Iterator[tuple[int, str | None, Problem]]:
    """Each CSV record's first line number and text (several lines when a quoted field holds
    line breaks), or why it is bad. Records are found before the csv module parses them, one
    at a time, so a record it refuses, or one whose quote is never closed, costs that record
    only: the lines after it are never read as part of it. A record over max_chars characters
    is bad as a whole (a long line is too). The text is None for a quote never closed: the
    lines after the record's first are then to be read again as rows of their own."""
    number, quoted, start, parts, size, cut = first_line - 1, False, 0, list[str](), 0, False
    for line in lines:
        number += 1
        if not quoted:
            start, parts, size, cut = number, [], 0, False
        cut = lines.take_cut() or cut or size + len(line) > max_chars
        if not cut:
            parts.append(line)
            size += len(line)
        quoted = _quote_open_after(line, quoted, delimiter)
        if quoted:
            continue
        if cut:
            span = f"lines {start}-{number}" if number > start else f"line {start}"
            yield start, "", ("bad_row", f"{span}: a record over {max_chars} characters")
        else:
            yield start, "".join(parts), None
    if quoted:
        detail = f"line {start}: a quote opened here is never closed; the lines after it are rows"
        yield start, None, ("bad_row", detail)


def _csv_rows(
    open_lines: Callable[[], _Lines], max_chars: int, delimiter: str
) -> Iterator[tuple[Row, Problem]]:
    """csv.DictReader's rows (a short row's missing columns are None), but a row with more
    fields than the header, or one the csv module refuses, is a bad row, not an error. A quote
    that is never closed makes its record bad, and the lines after it are read again as rows
    of their own."""
    header: list[str] | None = None
    first_line = 1
    while first_line:
        lines = open_lines()
        for _ in range(first_line - 1):  # the lines already read as rows
            next(lines, None)
        restart, first_line = first_line, 0
        for number, text, problem in _csv_records(lines, restart, max_chars, delimiter):
            if text is None:  # read again from the line after the unclosed quote's
                yield {}, problem
                first_line = number + 1
                break
            if problem is not None:
                yield {}, problem
                continue
            try:
                fields = next(csv.reader([text], delimiter=delimiter), [])
            except csv.Error as err:  # a field over the csv module's 128 KiB, say
                yield {}, ("bad_row", f"line {number}: {err}")
                continue
            if not fields:  # an empty line
                continue
            if header is None:
                header = [_column_name(cell) for cell in fields]
                continue
            row: Row = dict(zip(header, fields, strict=False))
            for key in header[len(fields) :]:
                row[key] = None
            if len(fields) > len(header):
                detail = f"line {number}: {len(fields)} fields, the header has {len(header)}"
                yield row, ("bad_row", detail)
            else:
                yield row, None


def _catalog_rows(path: Path, max_chars: int) -> Iterator[tuple[Row, Problem]]:
    found = _sniffed(path)
    if found.kind != "csv":
        with open(path, "rb") as binary, _text_stream(binary, None, found.encoding) as f:
            array = found.kind == "json_array"
            rows = _json_array_rows(f) if array else _jsonl_rows(f, max_chars)
            yield from ((_known_columns(row), problem) for row, problem in rows)
        return
    with contextlib.ExitStack() as files:

        def open_lines() -> _Lines:  # the CSV read from its start again after a bad quote
            files.close()
            binary = files.enter_context(open(path, "rb"))
            return _Lines(files.enter_context(_text_stream(binary, "", found.encoding)), max_chars)

        yield from _csv_rows(open_lines, max_chars, found.delimiter)


def _column_name(name: str) -> str:
    """A header's column as collect reads it: id, label, url and path whatever their case and
    surrounding spaces (`ID`, ` Label`), any other column as written."""
    folded = name.strip().lower()
    return folded if folded in _COLUMNS else name


def _known_columns(row: Row) -> Row:
    """A JSON row with its id, label, url and path keys found as _column_name finds them (a key
    spelt exactly so wins over another spelling)."""
    if all(key in _COLUMNS or _column_name(key) not in _COLUMNS for key in row):
        return row
    renamed: Row = {}
    for key, value in row.items():
        name = _column_name(key)
        if name == key or name not in row:
            renamed.setdefault(name, value)
        else:
            renamed[key] = value
    return renamed


def _nested_over(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (iterative: no recursion limit)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return False


def _invalid_text(row: Row) -> str | None:
    """A column name or value of the row (nested values too) that is not valid UTF-8."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in row.items()]
    while stack:
        key, value = stack.pop()
        if not is_valid_text(key):
            return f"column {escaped(key)!r}"
        if isinstance(value, str) and not is_valid_text(value):
            return f"{escaped(key)}: {escaped(value)[:200]}"
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
    return None


def _escaped_value(value: Any) -> Any:
    """A row's value with every text in valid UTF-8 (depth already bounded by MAX_DEPTH)."""
    if isinstance(value, str):
        return escaped(value)
    if isinstance(value, dict):
        return {escaped(str(k)): _escaped_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped_value(v) for v in value]
    return value


def _text(value: Any) -> str:
    """A column's value as text: None is empty, JSON numbers and containers are written out."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _checked(row: Row, problem: Problem) -> tuple[Row, Problem]:
    """The row as a record may hold it, and why it is bad beyond its parsing (nested too deep,
    text that is not valid UTF-8: kept escaped), if it is."""
    if problem is None and _nested_over(row, MAX_DEPTH):
        scalars = {k: v for k, v in row.items() if k in _COLUMNS and isinstance(v, str)}
        row, problem = scalars, ("bad_row", f"JSON nested deeper than {MAX_DEPTH} levels")
    if (where := _invalid_text(row)) is not None:
        row, problem = _escaped_value(row), problem or ("invalid_utf8", f"not UTF-8: {where}")
    return row, problem


def _absent_columns(row: Row, wanted: tuple[str, ...]) -> str:
    """When the row has none of the `wanted` columns at all (not merely empty ones), the
    columns it has: a header collect does not read ("; the catalog has no id column: ...")."""
    if any(name in row for name in wanted):
        return ""
    names = " or ".join(wanted)
    return f"; the catalog has no {names} column, its columns are {list(row)[:12]}"


def _from_cache(fetched: Mapping[str, FetchResult], url: str) -> bytes:
    result = fetched.get(url)
    if result is None:
        raise Rejected("unreadable", f"not downloaded: {url}")
    return result.read()


def _path_reader(root: str, value: str, max_bytes: int) -> Callable[[], bytes]:
    try:
        target = os.path.realpath(os.path.join(root, value))
    except (OSError, ValueError, RecursionError) as err:  # a NUL character, a long link chain
        return reject("unreadable", f"{value!r}: {err}")
    if not within(target, root):
        return reject("outside_source_root", value)
    return functools.partial(read_file_capped, target, max_bytes)


def _url_problem(url: str) -> str | None:
    try:
        return url_problem(url)
    except Exception as err:  # whatever the URL parser raises, the URL is refused
        return f"malformed URL ({type(err).__name__}: {err})"


def catalog_records(
    path: Path,
    source: str,
    fetched: Mapping[str, FetchResult],
    max_bytes: int,
    *,
    max_row_chars: int = MAX_ROW_CHARS,
) -> Iterator[InputRecord]:
    """Rows of a CSV/JSONL catalog: id, label and url or path (relative to the catalog's folder).
    Other columns are kept as metadata; a repeated id is refused (the first one wins). A URL
    row reads its body from `fetched`, filled by download_catalogs before anything is read."""
    return repeats_refused(_rows_as_records(path, source, fetched, max_bytes, max_row_chars), "row")


def _rows_as_records(
    path: Path, source: str, fetched: Mapping[str, FetchResult], max_bytes: int, max_chars: int
) -> Iterator[InputRecord]:
    root = os.path.realpath(path.parent)
    for n, (parsed, problem_parsing) in enumerate(_catalog_rows(path, max_chars), 1):
        row, problem = _checked(parsed, problem_parsing)
        rid = _text(row.get("id")).strip()
        label = _text(row.get("label"))
        meta = {k: v for k, v in row.items() if k not in _COLUMNS}
        url = _text(row.get("url")).strip()
        location = _text(row.get("path"))
        if problem is not None:
            yield InputRecord(rid or f"row-{n}", label, source, reject(*problem), meta)
        elif not rid:
            detail = f"row {n}" + _absent_columns(row, ("id",))
            yield InputRecord(f"row-{n}", label, source, reject("missing_id", detail), meta)
        elif url:
            why = _url_problem(url)
            read = reject("bad_url", why) if why else functools.partial(_from_cache, fetched, url)
            yield InputRecord(rid, label, source, read, meta, "" if why else url)
        elif location:
            yield InputRecord(rid, label, source, _path_reader(root, location, max_bytes), meta)
        else:
            detail = "no url or path" + _absent_columns(row, ("url", "path"))
            yield InputRecord(rid, label, source, reject("missing_location", detail), meta)
