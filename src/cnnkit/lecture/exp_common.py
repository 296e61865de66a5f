"""What the four experiment sections share: one-thread compute, quiet runs and Markdown tables.

Figures use the project's style: ``from cnnkit.train.plots import plt, save_figure`` inside the function
(Agg backend, imported on first use; written atomically)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from cnnkit.analysis.study import markdown_table


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The experiments' maps are small (tens of channels, 32 x 32): OpenMP hand-offs cost more than
    the work on a shared machine (as in ``cnnkit.segmentation.demo``), so they run on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_runner() -> Iterator[None]:
    """The runner logs a line per epoch; a section runs dozens of short runs, so only warnings pass."""
    logger = logging.getLogger("cnnkit.train")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats are written with 3 significant decimals."""
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return markdown_table(list(header), [[cell(v) for v in row] for row in rows]).rstrip("\n")
