"""Rewrite the measured section of a docs page: the text between two marker lines.

Every validation experiment regenerates its results block in ``docs/<method>.md`` between an
HTML-comment start and end marker, leaving the hand-written text around it untouched.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(page: Path, start: str, end: str, body: str, title: str | None = None) -> bool:
    """Write ``start``, ``body`` and ``end`` on their own lines in place of the marked section.

    Only the first ``start`` and the first ``end`` after it count; text outside is kept verbatim
    (``body`` is inserted literally, never interpreted as a regex replacement). A page without
    both markers gets them appended when ``title`` is given (a missing page is created as
    ``# title``); without ``title`` nothing is written. Returns whether the page was written.
    """
    text = page.read_text() if page.exists() else ""
    if start not in text or end not in text.partition(start)[2]:
        if title is None:
            return False
        text = (text or f"# {title}\n") + f"\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    tail = rest.partition(end)[2]
    page.write_text(f"{head}{start}\n{body}\n{end}{tail}")
    return True
