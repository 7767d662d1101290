"""A project folder for the moderators' training-photo review (vitrine.production.curation):
params.yaml as the repository's, dedupe's manifest and thumbnails, a decisions file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from tests.helpers import REPO
from tests.helpers.photos import photo_bytes
from vitrine.config import load_params

CLASSES = ("laptop", "phone")


def write_project(root: Path) -> Path:
    """params.yaml as the repository's, dedupe's manifest of 10 photos (noise candidates, two
    clusters, one a label conflict) with their thumbnails in a shard, and a decisions file."""
    params = load_params(REPO / "params.yaml")
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    paths = params["paths"]
    shard = root / paths["collected"] / "shards" / "shard-00000.tar"
    shard.parent.mkdir(parents=True)
    rows, blob = [], b""
    for i in range(10):
        photo = photo_bytes(100 + i)
        label = CLASSES[i % 2]
        rows.append(
            {
                "id": f"{label}/{i:03d}.jpg",
                "label": label,
                "status": "kept",
                "reason": "",
                "cluster_id": f"c{i:02d}",
                "noise_score": i / 10,
                "suggested_label": CLASSES[(i + (i in (2, 5))) % 2],
                "label_issue": i in (2, 5),
                "outlier_score": 4.5 if i in (3, 7) else 1.0,
                "thumb_shard": "shards/shard-00000.tar",
                "thumb_offset": len(blob),
                "thumb_length": len(photo),
            }
        )
        blob += photo
    shard.write_bytes(blob)
    rows[8] |= {"cluster_id": "c07", "status": "duplicate", "reason": "near_duplicate"}
    rows[0] |= {"cluster_id": "c01", "status": "label_conflict", "reason": "label_conflict"}
    rows[1] |= {"status": "label_conflict", "reason": "label_conflict"}
    deduped = root / paths["deduped"]
    deduped.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(deduped / "manifest.parquet", index=False)
    decisions = root / paths["decisions"]
    decisions.parent.mkdir(parents=True)
    decisions.write_text(
        "id,decision,new_label,note\nphone/009.jpg,drop,,a charger\n"
        'phone/003.jpg,relabel,laptop,"a laptop, listed as a phone"\n'
    )
    return root
