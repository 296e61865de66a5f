"""What every section of the lecture report is: text, figures and numbers compared with the lecture.

A section is a function ``build(out: Path, *, quick: bool, seed: int, progress: bool | None) ->
Section``. It writes its figures (PNG) into ``out`` under names it chooses (prefixed by its key, so
sections never collide) and returns a :class:`Section`. The report (``cnnkit lecture``) stores every
finished section as JSON, so a rerun reuses it; a section therefore must not keep state anywhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Number:
    """One number the lecture (or the paper it quotes) prints, beside the value cnnkit computes.

    ``lecture`` is the text as printed ("63000000", "7.5 Million"); ``computed`` the value cnnkit
    arrives at, as text; ``agrees`` is True, False (shown as a disagreement) or None (nothing to compare:
    the value needs ImageNet, for instance); ``note`` says why they differ or where the number comes from.
    """

    what: str
    lecture: str
    computed: str
    agrees: bool | None
    note: str = ""


@dataclass
class Section:
    key: str                      # short id, e.g. "alexnet"; also the figure prefix
    title: str                    # the lecture's slide title it follows
    markdown: str                 # body text (Markdown); figures referenced by file name
    figures: list[str] = field(default_factory=list)   # PNG files written into out
    numbers: list[Number] = field(default_factory=list)
    command: str = ""             # the command that reproduces this section on its own
    seconds: float = 0.0          # filled in by the report

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Section:
        data = dict(data)
        data["numbers"] = [Number(**n) for n in data.get("numbers", [])]
        return cls(**data)
