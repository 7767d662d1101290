"""dedupe: group byte-identical photos into clusters and keep one representative of each.

Re-uploads of the same photo would otherwise land in both train and test and inflate the
scores. Every collect row is carried over, so the manifest still accounts for every input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from stages.collect import MANIFEST
from vitrine.config import load_params, load_paths, stage_config


@dataclass(frozen=True)
class DedupeConfig:
    keep: str  # which member represents a cluster: "largest" (most pixels, ties by id)

    def __post_init__(self) -> None:
        if self.keep != "largest":
            raise ValueError(f"dedupe.keep: only 'largest' is supported, got {self.keep!r}")


def exact_clusters(manifest: pd.DataFrame) -> pd.Series:
    """cluster_id of each accepted row: the first 16 hex digits of its sha256 (stable across runs,
    so a photo keeps its cluster, and later its split, when new photos arrive)."""
    return manifest["sha256"].str[:16].where(manifest["status"] == "accepted", "")


def pick_representatives(manifest: pd.DataFrame) -> pd.Series:
    """Per cluster, the index of the kept row: the most pixels first, then the smallest
    (source, id), so the choice does not depend on input order."""
    accepted = manifest[manifest["cluster_id"] != ""].assign(
        pixels=lambda d: d["width"] * d["height"]
    )
    ordered = accepted.sort_values(
        ["cluster_id", "pixels", "source", "id"], ascending=[True, False, True, True]
    )
    return ordered.groupby("cluster_id").head(1).set_index("cluster_id")["id"]


def dedupe(manifest: pd.DataFrame, config: DedupeConfig) -> pd.DataFrame:
    """Add cluster_id and representative; mark duplicates and label conflicts."""
    out = manifest.copy()
    out["cluster_id"] = exact_clusters(out)
    accepted = out["cluster_id"] != ""
    rep = pick_representatives(out)
    out["representative"] = out["cluster_id"].map(rep).fillna("")
    n_labels = out[accepted].groupby("cluster_id")["label"].nunique()
    conflict = accepted & out["cluster_id"].map(n_labels).gt(1)
    duplicate = accepted & ~conflict & (out["id"] != out["representative"])
    out.loc[accepted, "status"] = "kept"
    out.loc[duplicate, "status"] = "duplicate"
    out.loc[duplicate, "reason"] = "exact_duplicate"
    out.loc[duplicate, "detail"] = "same bytes as " + out.loc[duplicate, "representative"]
    # Same photo, different labels: a human decides; neither copy is trained on meanwhile.
    out.loc[conflict, "status"] = "label_conflict"
    out.loc[conflict, "reason"] = "label_conflict"
    labels = out[conflict].groupby("cluster_id")["label"].agg(lambda s: sorted(set(s)))
    out.loc[conflict, "detail"] = out.loc[conflict, "cluster_id"].map(
        lambda c: f"cluster labelled {labels[c]}"
    )
    return out


def dedupe_report(deduped: pd.DataFrame) -> dict[str, Any]:
    clustered = deduped[deduped["cluster_id"] != ""]
    sizes = clustered.groupby("cluster_id").size()
    return {
        "records": len(deduped),
        "kept": int((deduped["status"] == "kept").sum()),
        "duplicates": int((deduped["status"] == "duplicate").sum()),
        "label_conflicts": int((deduped["status"] == "label_conflict").sum()),
        "clusters": len(sizes),
        "clusters_with_copies": int((sizes > 1).sum()),
    }


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(DedupeConfig, "dedupe", params)
    deduped = dedupe(pd.read_parquet(paths.collected / MANIFEST), config)
    paths.deduped.mkdir(parents=True, exist_ok=True)
    deduped.to_parquet(paths.deduped / MANIFEST, index=False)
    report = dedupe_report(deduped)
    paths.dedupe_report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"dedupe: {report}")


if __name__ == "__main__":
    main()
