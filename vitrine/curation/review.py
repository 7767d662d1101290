"""The human review page: noise candidates and near-duplicate clusters as a thumbnail gallery.

A reviewer looks at the page and writes decisions into data/review/decisions.csv
(id, decision = keep | drop | relabel | other, new_label, note); dedupe applies them on the next
run. `other` (none of the classes) is offered on the page when params.yaml names an other_class.
The page is one self-contained HTML file (thumbnails inlined) so it can be mailed or archived.

The layout is the jinja2 template templates/review.html.j2; this module turns the data frames
into plain values for it (scores formatted, thumbnails base64-encoded). The template escapes
every value, so labels, file names and notes from the data cannot inject markup.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from vitrine import pages

TEMPLATE = Path(__file__).parent / "templates" / "review.html.j2"


def _photo(row: pd.Series, thumb: Callable[[pd.Series], bytes]) -> dict[str, str]:
    return {"id": str(row["id"]), "thumb": base64.b64encode(thumb(row)).decode()}


def candidate_cards(
    candidates: pd.DataFrame, thumb: Callable[[pd.Series], bytes]
) -> list[dict[str, str]]:
    """One card per noise candidate, in the frame's order."""
    return [
        _photo(r, thumb)
        | {
            "label": str(r["label"]),
            "suggested_label": str(r["suggested_label"]),
            "noise_score": f"{r['noise_score']:.2f}",
            "outlier_score": f"{r['outlier_score']:.1f}",
            "cluster_id": str(r["cluster_id"]),
        }
        for _, r in candidates.iterrows()
    ]


def cluster_rows(
    members: pd.DataFrame, thumb: Callable[[pd.Series], bytes]
) -> list[dict[str, Any]]:
    """One row per cluster (sorted by id), its photos in the frame's order."""
    return [
        {
            "id": str(cluster_id),
            "photos": [
                _photo(r, thumb)
                | {
                    "label": str(r["label"]),
                    "status": str(r["status"]),
                    "reason": str(r["reason"] or "representative"),
                }
                for _, r in group.iterrows()
            ],
        }
        for cluster_id, group in members.groupby("cluster_id", sort=True)
    ]


def review_page(
    candidates: pd.DataFrame,
    clusters: pd.DataFrame,
    thumb: Callable[[pd.Series], bytes],
    decisions_path: str,
    other_class: str = "",
    cluster_total: int = 0,
) -> dict[str, Any]:
    """Everything the template shows, as strings, numbers, lists and dicts. `cluster_total`:
    how many clusters there are when `clusters` holds only some of them (0: all shown)."""
    shown = clusters["cluster_id"].nunique()
    return {
        "other_class": other_class,
        "candidate_count": len(candidates),
        "cluster_count": shown,
        "cluster_total": max(cluster_total, shown),
        "decisions_path": decisions_path,
        "candidates": candidate_cards(candidates, thumb),
        "clusters": cluster_rows(clusters, thumb),
    }


def render_review(
    candidates: pd.DataFrame,
    clusters: pd.DataFrame,
    thumb: Callable[[pd.Series], bytes],
    decisions_path: str,
    other_class: str = "",
    cluster_total: int = 0,
) -> str:
    """The review page: candidates (most suspicious first), then multi-photo clusters; with an
    other_class, each candidate's `other` decision line too."""
    page = review_page(candidates, clusters, thumb, decisions_path, other_class, cluster_total)
    return pages.template(TEMPLATE).render(page=page)
