"""Printing a benchmark's figures as an aligned two-column table."""

from __future__ import annotations


def print_table(rows: list[tuple[str, str]]) -> None:
    """One row per figure: its label, then its value; a value of several lines (``\\n``) goes on under the value
    column."""
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        first, *rest = v.split("\n")
        print(f"{k.ljust(width)}  {first}")
        for line in rest:
            print(f"{' ' * width}  {line}")
