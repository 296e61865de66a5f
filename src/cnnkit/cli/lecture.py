"""``cnnkit lecture``: the lecture reproduced in one command (report.md, report.html, numbers, figures)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cnnkit.cli.argtypes import positive_int, seed

EPILOG = """examples:
  cnnkit lecture --out runs/lecture            the full report (about 5 minutes on 2 cores)
  cnnkit lecture --out runs/lecture --quick    every section at smoke-test scale (about 1 minute)
  cnnkit lecture --out runs/lecture --only alexnet,toy_example --rebuild
                                               build two sections again, keep the others
  cnnkit lecture --list                        the sections, in the lecture's order

A rerun reuses every finished section built with the same --quick and --seed (an interrupted
report resumes); --rebuild builds them all again."""


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def run_lecture(args: argparse.Namespace) -> int:
    from cnnkit.lecture.report import PARTS, build_report, check_keys, counts
    from cnnkit.utils import output_folder

    if args.list:
        for part in PARTS:
            module, _, name = part.target.partition(":")
            print(f"{part.key:20s} {part.part}  ({module.rsplit('.', 1)[-1]})")
        return 0
    if args.only:
        check_keys(args.only)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    if not args.verbose:  # one line per section, not the epochs of every network the sections train
        logging.getLogger("cnnkit").setLevel(logging.WARNING)

    def show(section, reused: bool) -> None:
        how = "reused" if reused else f"{section.seconds:g} s"
        bad = sum(n.agrees is False for n in section.numbers)
        flag = f", {bad} disagreeing (with reasons)" if bad else ""
        print(f"{section.key:20s} {how:>8s}  {len(section.numbers)} numbers{flag}, {len(section.figures)} figures",
              flush=True)

    with output_folder(args.out, keep_complete=True) as out:
        sections = build_report(out, quick=args.quick, only=args.only, seed=args.seed, rebuild=args.rebuild,
                                on_section=show)
    c = counts(sections)
    print(f"wrote {out / 'report.md'} and report.html: {len(sections)} sections, {c['numbers']} numbers "
          f"({c['agree']} agree, {c['disagree']} disagree, {c['not compared']} not comparable here) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lecture", help="the lecture reproduced: every number beside cnnkit's, every figure redrawn",
        description="Walk X. Wang's lecture in its order and write a report (Markdown and HTML with PNG "
        "figures): every number the lecture prints beside the value cnnkit computes, marked where they "
        "disagree and why; the figures redrawn from cnnkit's own code; the lecture's experiments run on "
        "data the project has (digits, generated shapes). Results that need ImageNet are listed with their "
        "source, not faked. numbers.json and numbers.csv hold every number.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lecture"), help="report folder (default runs/lecture)")
    p.add_argument("--quick", action="store_true", help="every section at smoke-test scale (about a minute)")
    p.add_argument("--only", type=_keys, metavar="KEYS",
                   help="comma-separated sections to build, or reuse when already built (see --list)")
    p.add_argument("--rebuild", action="store_true", help="build every section again instead of reusing it")
    p.add_argument("--seed", type=seed, default=0, help="random seed of every experiment (default 0)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: the report's networks are small, and on a machine that other "
                   "jobs share one thread is several times faster than two)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.set_defaults(func=run_lecture)
