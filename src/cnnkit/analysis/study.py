"""What the studies (transfer, ablate) share: a resumable results file, tables, a progress bar.

A study is a list of cells (one training each). ``results.json`` holds the study's settings and one
entry per finished cell; it is rewritten atomically after every cell, so an interrupted study
(Ctrl-C, kill, power loss) keeps every cell it finished and a rerun trains only the missing ones.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from tqdm import tqdm

from cnnkit.errors import ConfigError
from cnnkit.utils import ensure_writable_dir, write_json_atomic, write_text_atomic


class ResultStore:
    """``results.json`` in ``out``: {"study", "settings", "cells": {key: result}}.

    Settings that change the results must match those of a study already in ``out``: mixing cells
    trained under different settings in one table would be wrong, so that is refused.
    """

    def __init__(self, out: str | Path, study: str, settings: dict, *, ignore: tuple[str, ...] = ()):
        self.out = ensure_writable_dir(out)
        self.path = self.out / "results.json"
        self.study, self.settings = study, json.loads(json.dumps(settings, default=str))
        self.cells: dict[str, dict] = {}
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                cells, old = saved["cells"], saved["settings"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{self.path} is not a cnnkit study results file; choose another --out") from None
            if saved.get("study") != study:
                raise ConfigError(f"{self.out} holds a {saved.get('study')!r} study, not {study!r}; "
                                  "choose another --out")
            diff = [k for k in sorted(set(old) | set(self.settings))
                    if k not in ignore and old.get(k) != self.settings.get(k)]
            if diff:
                k = diff[0]
                raise ConfigError(f"{self.out} holds a study run with other settings ({k}: {old.get(k)!r} there, "
                                  f"{self.settings.get(k)!r} now); use the same settings to continue it "
                                  "or choose another --out")
            self.cells = cells

    def done(self, key: str) -> bool:
        return key in self.cells

    def record(self, key: str, result: dict) -> None:
        self.cells[key] = result
        write_json_atomic(self.path, {"study": self.study, "settings": self.settings, "cells": self.cells})


def cell_bar(total: int, done: int, desc: str, progress: bool | None = None) -> tqdm:
    """A bar over a study's cells; quiet when stderr is not a terminal (unless ``progress``)."""
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(total=total, initial=done, desc=desc, unit="cell", disable=disable, dynamic_ncols=True)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, stem: str, header: list[str], rows: list[list], *, title: str = "") -> tuple[Path, Path]:
    """``stem.md`` (a Markdown table, optionally under a title) and ``stem.csv``, both atomic."""
    md, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    write_text_atomic(md, (f"{title}\n\n" if title else "") + markdown_table(header, rows))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[("" if v is None else v) for v in row] for row in rows])
    write_text_atomic(csv_path, buf.getvalue())
    return md, csv_path
