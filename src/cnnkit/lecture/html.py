"""The small part of Markdown the lecture report uses, as one HTML page (no dependency needed).

Handled: ``#`` headings, paragraphs, ``-`` lists (one nesting level), pipe tables, fenced code blocks,
images, links, inline code, bold and italics; a line that starts with ``<`` passes through as HTML.
"""

from __future__ import annotations

import html
import re

STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.45}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:.25em .5em;"
         "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:.5em;"
         "overflow-x:auto;font-size:85%}code{background:#f6f6f6}")

INLINE = [
    (re.compile(r"!\[([^\]]*)\]\(([^)]+)\)"), r'<img alt="\1" src="\2">'),
    (re.compile(r"\[([^\]]+)\]\(([^)]+)\)"), r'<a href="\2">\1</a>'),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"<i>\1</i>"),
]
CODE = re.compile(r"`([^`]+)`")


def inline(text: str) -> str:
    parts = CODE.split(text)  # odd items are code spans
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        part = html.escape(part, quote=False).replace("&amp;nbsp;", "&nbsp;")
        for pattern, repl in INLINE:
            part = pattern.sub(repl, part)
        out.append(part)
    return "".join(out)


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head, body = cells[0], [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    th = "".join(f"<th>{inline(c)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def markdown_to_html(text: str, title: str = "") -> str:
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            blocks.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if not line.strip():
            i += 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("<"):
            blocks.append(line)
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
            continue
        elif line.lstrip().startswith("- "):
            j, items = i, []
            while j < len(lines) and lines[j].lstrip().startswith("- "):
                nested = lines[j].startswith(" ")
                item = inline(lines[j].lstrip()[2:])
                if nested and items:
                    items[-1][1].append(item)
                else:
                    items.append((item, []))
                j += 1
            blocks.append("<ul>" + "".join(f"<li>{t}" + ("<ul>" + "".join(f"<li>{s}</li>" for s in sub) + "</ul>"
                                                             if sub else "") + "</li>" for t, sub in items) + "</ul>")
            i = j
            continue
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("#", "|", "- ", "```", "<")):
                j += 1
            blocks.append("<p>" + inline(" ".join(lines[i:j])) + "</p>")
            i = j
            continue
        i += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(blocks) + "\n</body></html>\n")
