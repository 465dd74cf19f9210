"""``report.html``: the run on one page a person can look at, most anomalous subject first.

Each subject's overview figure is shown beside its score and flagged volume; all figures share the cohort's
colour scale with the threshold marked on it (see ``overview.save_overview``), so a healthy subject's map
looks as cool as it is. The page is plain HTML next to the figures it links to (no script, no server).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .outputs import atomic_path, readable, subject_files
from .overview import CROSS_COLOUR, FLAGGED_COLOUR, HEAT_CMAP

__all__ = ["write_cohort_report"]

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ccc;padding:6px 10px;text-align:left;vertical-align:middle}
.warning{background:#fee;border:1px solid #c00;padding:1em;white-space:pre-wrap}pre{background:#f6f6f6;padding:1em}"""


def write_cohort_report(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    threshold: float,
    scale: float | None,
    backbone: str,
    note: str,
    settings: Mapping[str, Any],
    problems: Sequence[str],
) -> Path:
    """Write the page; ``rows`` are the ``scores.csv`` rows, ``note`` the not-pretrained banner (or empty)."""
    path = Path(path)
    ranked = sorted(rows, key=lambda r: -r["subject_score"] if math.isfinite(r["subject_score"]) else math.inf)
    e = html.escape
    body = [
        "<h1>CS3F cohort report</h1>",
        f'<div class="warning">{e(note)}</div>' if note else "",
        f"<p><b>{len(rows)}</b> subject(s) scored against each other, {len(problems)} skipped. Backbone: {e(backbone)}.</p>",
        f"<p>Operating threshold <b>{threshold:.4g}</b>: voxels whose heat is at or above it are flagged and outlined in "
        f"{FLAGGED_COLOUR}. Every figure uses one colour scale ({HEAT_CMAP}, 0 to "
        f"{'%.4g' % scale if scale is not None else 'each subject’s maximum'}), with the threshold as a {FLAGGED_COLOUR} line "
        f"on its colour bar; the {CROSS_COLOUR} cross marks each subject's most anomalous region. Subject score: mean of "
        "the highest 1 % of voxel scores inside the subject's mask; flagged volume: the volume at or above the threshold.</p>",
        "<table><tr><th>rank</th><th>subject</th><th>subject score</th><th>flagged volume (ml)</th><th>overview</th></tr>",
    ]
    for rank, row in enumerate(ranked, 1):
        name = readable(row["subject"])
        figure = subject_files(path.parent, row["subject"])["overview"]
        link = quote(os.fsencode(figure.name))  # the file's own bytes, even when its name is not UTF-8
        image = (
            f'<a href="{link}"><img src="{link}" width="560" alt="{e(name)}"></a>'
            if figure.is_file()
            else "(no figure)"
        )
        body.append(
            f"<tr><td>{rank}</td><td>{e(name)}<br><small>{e(readable(str(row['image'])))}</small></td>"
            f"<td>{row['subject_score']:.4g}</td><td>{row['lesion_volume_ml']:.2f}</td><td>{image}</td></tr>"
        )
    body.append("</table>")
    if problems:
        body += ["<h2>Skipped subjects</h2><ul>", *(f"<li>{e(readable(p))}</li>" for p in problems), "</ul>"]
    body += ["<h2>Settings</h2>", f"<pre>{e(json.dumps(dict(settings), indent=2, default=str))}</pre>"]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>CS3F cohort report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
