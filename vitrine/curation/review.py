"""The human review page: noise candidates and near-duplicate clusters as a thumbnail gallery.

A reviewer looks at the page and writes decisions into data/review/decisions.csv
(id, decision = keep | drop | relabel, new_label, note); dedupe applies them on the next run.
The page is one self-contained HTML file (thumbnails inlined) so it can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import pandas as pd

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
h1{font-size:1.5rem} h2{font-size:1.2rem;margin-top:2rem}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:180px;font-size:12px}
.card img{width:168px;height:126px;object-fit:contain;background:#f4f4f4}
.cluster{display:flex;gap:8px;align-items:flex-start;border-bottom:1px solid #eee;padding:8px 0}
.warn{color:#b00} code{background:#f4f4f4;padding:1px 3px;word-break:break-all}
"""


def _img(data: bytes) -> str:
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _card(row: pd.Series, thumb: bytes, lines: list[str]) -> str:
    text = "<br>".join(lines)
    return f'<div class="card">{_img(thumb)}<br><b>{html.escape(row["id"])}</b><br>{text}</div>'


def candidate_cards(candidates: pd.DataFrame, thumb: Callable[[pd.Series], bytes]) -> str:
    cards = []
    for _, r in candidates.iterrows():
        lines = [
            f"given: <b>{html.escape(r['label'])}</b>",
            f'suggested: <b class="warn">{html.escape(r["suggested_label"])}</b>',
            f"label-issue score: {r['noise_score']:.2f}",
            f"outlier score: {r['outlier_score']:.1f}",
            f"cluster: {html.escape(r['cluster_id'])}",
            f"<code>{html.escape(r['id'])},drop,,</code>",
        ]
        cards.append(_card(r, thumb(r), lines))
    return '<div class="grid">' + "".join(cards) + "</div>"


def cluster_rows(members: pd.DataFrame, thumb: Callable[[pd.Series], bytes]) -> str:
    rows = []
    for cluster_id, group in members.groupby("cluster_id", sort=True):
        cards = [
            _card(
                r,
                thumb(r),
                [
                    f"{html.escape(r['label'])} · {html.escape(r['status'])}",
                    html.escape(r["reason"] or "representative"),
                ],
            )
            for _, r in group.iterrows()
        ]
        rows.append(
            f'<div class="cluster"><div>{html.escape(cluster_id)}</div>{"".join(cards)}</div>'
        )
    return "".join(rows)


def render_review(
    candidates: pd.DataFrame,
    clusters: pd.DataFrame,
    thumb: Callable[[pd.Series], bytes],
    decisions_path: str,
) -> str:
    """The review page: candidates (most suspicious first), then multi-photo clusters."""
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>vitrine review</title><style>{STYLE}</style></head><body>
<h1>Photos to review</h1>
<p>{len(candidates)} noise candidates and {clusters["cluster_id"].nunique()} near-duplicate
clusters. Record a decision per photo in <code>{html.escape(decisions_path)}</code>
(<code>id,decision,new_label,note</code>; decision is keep, drop or relabel) and run
<code>dvc repro</code>: it overrides the automatic choices and survives re-runs.</p>
<h2>Noise candidates</h2>{candidate_cards(candidates, thumb)}
<h2>Near-duplicate clusters</h2>{cluster_rows(clusters, thumb)}
</body></html>"""
