"""``cnnkit lecture``: the lecture walked in its order, every number beside cnnkit's, every figure redrawn.

The report is a list of sections (:mod:`cnnkit.lecture.section`), each built by one function from
cnnkit's own code. A finished section is stored as ``sections/KEY.json`` in the output folder,
atomically, with the settings it was built under; a rerun with the same settings reuses it, so an
interrupted report resumes where it stopped and ``--only`` rebuilds single sections. At the end the
report is written as ``report.md`` (Markdown with PNG figures), ``report.html`` (the same, one page)
and ``numbers.json`` / ``numbers.csv`` (every lecture number with cnnkit's value).

``quick`` runs every experiment at smoke-test scale (minutes in all, run by the test suite); the full
report trains longer and measures on larger inputs. Numbers that need ImageNet are listed, not faked.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnkit.errors import ConfigError
from cnnkit.lecture.html import markdown_to_html
from cnnkit.lecture.section import Section
from cnnkit.utils import ensure_writable_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = 1  # bump when a stored section would no longer be valid


@dataclass(frozen=True)
class Part:
    key: str
    target: str  # "module:function" building the section
    part: str    # the lecture's part it belongs to


# The lecture's order: its three parts, slide by slide.
BASICS = "Convolutional neural network"
STRUCTURES = "Different CNN structures for image classification"
PIXELWISE = "CNN for pixelwise classification"
PARTS = [
    Part("lenet", "cnnkit.lecture.zoo_numbers:lenet", BASICS),
    Part("receptive_fields", "cnnkit.lecture.figures:receptive_fields", BASICS),
    Part("equivariance", "cnnkit.lecture.figures:equivariance", BASICS),
    Part("fft", "cnnkit.lecture.figures:fft", BASICS),
    Part("stride1_pooling", "cnnkit.lecture.experiments:stride1_pooling", BASICS),
    Part("learned_invariance", "cnnkit.lecture.figures:learned_invariance", BASICS),
    Part("alexnet", "cnnkit.lecture.zoo_numbers:alexnet", STRUCTURES),
    Part("relu_tanh", "cnnkit.lecture.experiments:relu_tanh", STRUCTURES),
    Part("deep_image", "cnnkit.lecture.zoo_numbers:deep_image", STRUCTURES),
    Part("filters", "cnnkit.lecture.figures:filters", STRUCTURES),
    Part("studies", "cnnkit.lecture.figures:studies", STRUCTURES),
    Part("chatfield", "cnnkit.lecture.zoo_numbers:chatfield", STRUCTURES),
    Part("clarifai", "cnnkit.lecture.zoo_numbers:clarifai", STRUCTURES),
    Part("overfeat", "cnnkit.lecture.zoo_numbers:overfeat", STRUCTURES),
    Part("vgg", "cnnkit.lecture.zoo_numbers:vgg", STRUCTURES),
    Part("nin", "cnnkit.lecture.zoo_numbers:nin", STRUCTURES),
    Part("googlenet", "cnnkit.lecture.zoo_numbers:googlenet", STRUCTURES),
    Part("imagenet", "cnnkit.lecture.imagenet_numbers:imagenet", STRUCTURES),
    Part("direct_maps", "cnnkit.lecture.experiments:direct_maps", PIXELWISE),
    Part("strided_fcn", "cnnkit.lecture.experiments:strided_fcn", PIXELWISE),
    Part("sparse_kernels", "cnnkit.lecture.figures:sparse_kernels", PIXELWISE),
    Part("toy_example", "cnnkit.lecture.figures:toy_example", PIXELWISE),
    Part("pixelwise", "cnnkit.lecture.pixelwise_numbers:speedup", PIXELWISE),
]
KEYS = [p.key for p in PARTS]


def builder(part: Part) -> Callable[..., Section]:
    module, _, name = part.target.partition(":")
    return getattr(importlib.import_module(module), name)


def check_keys(keys: list[str]) -> list[str]:
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        raise ConfigError(f"--only: no section named {', '.join(unknown)}; choose from {', '.join(KEYS)} "
                          "(`cnnkit lecture --list` describes them)")
    return keys


class SectionStore:
    """``sections/KEY.json``: a finished section and the settings it was built under."""

    def __init__(self, out: Path, settings: dict):
        self.folder = ensure_writable_dir(out / "sections")
        self.out, self.settings = out, {"format": FORMAT, **settings}

    def load(self, key: str) -> Section | None:
        path = self.folder / f"{key}.json"
        try:
            saved = json.loads(path.read_text())
            if saved["settings"] != self.settings:
                return None
            section = Section.from_json(saved["section"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("warning: %s is damaged; building the section again", path)
            return None
        if not all((self.out / f).is_file() for f in section.figures):
            return None  # a figure was deleted: build again
        return section

    def save(self, section: Section) -> None:
        write_json_atomic(self.folder / f"{section.key}.json",
                          {"settings": self.settings, "section": section.to_json()})


def build_report(out: str | Path, *, quick: bool = False, only: list[str] | None = None, seed: int = 0,
                 progress: bool | None = None, rebuild: bool = False,
                 on_section: Callable[[Section, bool], None] | None = None) -> list[Section]:
    """Build (or reuse) the sections and write the report; returns the sections in report order.

    ``only``: build just these keys (the report then holds them and any stored ones of the same settings).
    ``rebuild``: ignore stored sections. ``on_section(section, reused)`` is called after each.
    """
    out = ensure_writable_dir(out)
    wanted = check_keys(only) if only else KEYS
    store = SectionStore(out, {"quick": quick, "seed": seed})
    sections: list[Section] = []
    for part in PARTS:
        stored = store.load(part.key)
        if part.key not in wanted:
            if stored is not None:
                sections.append(stored)
            continue
        if stored is not None and not rebuild:
            sections.append(stored)
            if on_section:
                on_section(stored, True)
            continue
        t0 = time.perf_counter()
        section = builder(part)(out, quick=quick, seed=seed, progress=progress)
        section.seconds = round(time.perf_counter() - t0, 1)
        store.save(section)
        sections.append(section)
        if on_section:
            on_section(section, False)
    write_report(out, sections, quick=quick, seed=seed)
    return sections


# --------------------------------------------------------------------------- writing


def counts(sections: list[Section]) -> dict[str, int]:
    numbers = [n for s in sections for n in s.numbers]
    return {"numbers": len(numbers), "agree": sum(n.agrees is True for n in numbers),
            "disagree": sum(n.agrees is False for n in numbers), "not compared": sum(n.agrees is None for n in numbers)}


def report_markdown(sections: list[Section], *, quick: bool, seed: int) -> str:
    c = counts(sections)
    scale = "quick (smoke-test scale)" if quick else "full"
    lines = [
        "# The lecture, reproduced",
        "",
        "X. Wang, *Convolutional Neural Network* (lecture, 2015), walked in its order with cnnkit. Every number "
        "the lecture prints stands beside the value cnnkit computes; every figure that can be computed is "
        "redrawn from cnnkit's own code. Each section names the command that reproduces it on its own.",
        "",
        f"Scale: {scale}, seed {seed}. Numbers: {c['numbers']}; cnnkit agrees with {c['agree']}, disagrees with "
        f"{c['disagree']} (each with its reason), and {c['not compared']} cannot be compared here (they need "
        "ImageNet, or the lecture gives no number).",
        "",
        "## Contents",
        "",
    ]
    part = None
    for s in sections:
        p = next(x.part for x in PARTS if x.key == s.key)
        if p != part:
            lines.append(f"- **{p}**")
            part = p
        lines.append(f"  - [{s.title}](#{s.key})")
    part = None
    for s in sections:
        p = next(x.part for x in PARTS if x.key == s.key)
        if p != part:
            lines += ["", f"# {p}"]
            part = p
        lines += ["", f'<a id="{s.key}"></a>', "", f"## {s.title}", "",
                  f"*Reproduce:* `{s.command}` &nbsp; *Built in:* {s.seconds:g} s", "", s.markdown.strip()]
        lines += [f"\n![{s.title}: {f}]({f})" for f in s.figures if f"]({f})" not in s.markdown]
    disagree = [(s.key, n) for s in sections for n in s.numbers if n.agrees is False]
    if disagree:
        lines += ["", "# Where the lecture and cnnkit disagree", "",
                  "| section | what | lecture | cnnkit | why |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {n.what} | {n.lecture} | {n.computed} | {n.note} |" for k, n in disagree]
    return "\n".join(lines) + "\n"


def write_report(out: Path, sections: list[Section], *, quick: bool, seed: int) -> None:
    text = report_markdown(sections, quick=quick, seed=seed)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", markdown_to_html(text, title="The lecture, reproduced"))
    records = [{"section": s.key, **n.__dict__} for s in sections for n in s.numbers]
    write_json_atomic(out / "numbers.json", {"quick": quick, "seed": seed, "counts": counts(sections),
                                             "numbers": records})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["section", "what", "lecture", "computed", "agrees", "note"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(out / "numbers.csv", buf.getvalue())
