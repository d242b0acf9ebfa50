"""One reader of a Lightning metrics.csv that may be damaged (cut by a kill, garbage, edited by hand).

The report reads it for curves; a resumed run reads it to keep the epochs it had finished. Both keep
the intact rows only and say, in one line naming the file, what was left out.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

__all__ = ["intact_rows"]


def intact_rows(raw: bytes, path: Path, whole: str) -> tuple[list[dict[str, str]], list[str], str | None]:
    """The intact rows of a metrics.csv, its header, and what is wrong with the rest (None when nothing is).

    Args:
        raw: The file's bytes.
        path: The file, named in the message.
        whole: What the caller does when nothing can be used ("left out the job's curves").

    Returns:
        (rows as dicts, header, problem): a file damaged throughout gives no rows.
    """
    text = raw.decode("utf-8", errors="replace")  # a stray byte spoils its own row only
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
    except csv.Error:
        header = []
    if not raw.strip():
        return [], header, f"{path} is empty: {whole}"
    if "epoch" not in header or len(set(header)) != len(header) or any(_stray(h) for h in header):
        return [], [], f"{path} has no metrics header (epoch, step, ...): {whole}"
    lines: list[tuple[int, list[str]]] = []
    bad: list[tuple[int, str]] = []
    try:
        for fields in reader:
            lines.append((reader.line_num, fields))
    except csv.Error as e:
        bad.append((reader.line_num, f"and the rest cannot be parsed ({e})"))
    # the writer ends every row with a newline: a last line without one was cut off by a kill
    cut = lines[-1][0] if lines and not text.endswith(("\n", "\r")) else None
    good = []
    for line, fields in lines:
        why = "is cut off" if line == cut else _row_problem(fields, header) if fields else None
        if why:
            bad.append((line, why))
        elif fields:
            good.append(dict(zip(header, fields)))
    if not bad:
        return good, header, None
    bad.sort()
    shown = "; ".join(f"line {n} {why}" for n, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if sum(n != cut for n, _ in bad) > len(good):  # mostly garbage: the few rows that parse mean nothing
        return [], header, f"{path} is damaged throughout ({shown}): {whole}"
    if len(bad) == 1:
        return good, header, f"{path} line {bad[0][0]} {bad[0][1]}: ignored that row"
    return good, header, f"{path} has {len(bad)} damaged rows ({shown}): ignored them"


def _stray(text: str) -> bool:
    return "\ufffd" in text or "\x00" in text


def _row_problem(fields: list[str], header: list[str]) -> str | None:
    """Why a metrics.csv row cannot be used (None when it can)."""
    if len(fields) != len(header):
        return f"has {len(fields)} of {len(header)} columns"
    for key, value in zip(header, fields):
        if value == "":
            continue
        if _stray(value):
            return f"has bytes that are not text in {key}"
        try:
            number = float(value)
        except ValueError:
            return f"has {_short(value)} in {key}, not a number"
        if key in ("epoch", "step") and not (number.is_integer() and number >= 0):
            return f"has {key} {_short(value)}, not a whole number"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
