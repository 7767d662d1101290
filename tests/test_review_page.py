"""The review gallery (vitrine/curation/review.py and its template)."""

import base64

import jinja2
import pandas as pd
import pytest

from tests.helpers.html import HOSTILE, Text
from vitrine import pages
from vitrine.curation import review
from vitrine.curation.review import render_review, review_page


def thumb(row: pd.Series) -> bytes:
    return f"jpeg of {row['id']}".encode()


def candidates(label: str = "phone") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["a.jpg", "b.jpg"],
            "label": [label, "laptop"],
            "suggested_label": ["laptop", "phone"],
            "noise_score": [0.9166, 0.5],
            "outlier_score": [3.14159, 12.0],
            "cluster_id": ["c1", ""],
        }
    )


def clusters(label: str = "phone", reason: str = "near_duplicate") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["y1", "y2", "x1"],
            "label": [label, label, "laptop"],
            "status": ["kept", "dropped", "kept"],
            "reason": ["", reason, ""],
            "cluster_id": ["c2", "c2", "c1"],
        }
    )


def test_page_shows_counts_cards_and_clusters_in_order() -> None:
    page = render_review(candidates(), clusters(), thumb, "data/review/decisions.csv")
    parsed = Text()
    parsed.feed(page)
    text = parsed.text
    assert "2 noise candidates and 2 near-duplicate clusters" in text
    assert "decision per photo in data/review/decisions.csv" in text
    assert "a.jpg given: phone suggested: laptop label-issue score: 0.92" in text
    assert "outlier score: 3.1 cluster: c1 a.jpg,drop,," in text
    # clusters sorted by id; an empty reason is the cluster's representative
    assert text.index("c1 x1 laptop · kept representative") < text.index("c2 y1 phone · kept")
    assert "y2 phone · dropped near_duplicate" in text
    assert (
        parsed.images[0] == "data:image/jpeg;base64," + base64.b64encode(b"jpeg of a.jpg").decode()
    )
    assert len(parsed.images) == 5
    parsed = Text()
    parsed.feed(render_review(candidates(), clusters(), thumb, "d.csv", cluster_total=900))
    assert "2 noise candidates and 900 near-duplicate clusters (the 2 largest shown" in parsed.text


def test_hostile_labels_ids_and_notes_are_escaped() -> None:
    hostile = candidates(label=HOSTILE)
    hostile.loc[1, "id"] = HOSTILE
    page = render_review(hostile, clusters(HOSTILE, HOSTILE), thumb, HOSTILE)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    parsed = Text()
    parsed.feed(page)
    assert f"given: {HOSTILE}" in parsed.text  # shown as text, literally
    assert f"{HOSTILE},drop,," in parsed.text


def test_a_variable_the_page_lacks_is_an_error() -> None:
    template = pages.template(review.TEMPLATE)
    page = review_page(candidates(), clusters(), thumb, "decisions.csv")
    assert template.render(page=page) == render_review(
        candidates(), clusters(), thumb, "decisions.csv"
    )
    del page["cluster_count"]
    with pytest.raises(jinja2.UndefinedError, match="cluster_count"):
        template.render(page=page)
    with pytest.raises(jinja2.UndefinedError):
        template.render()
