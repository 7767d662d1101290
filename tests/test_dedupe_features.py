"""dedupe's feature pass: the same features in process, on a local Dask cluster and on a
cluster by address; a photo's features do not depend on the photos computed with it; the
cache answers a rerun; ONNX Runtime computes what the torch networks compute."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers.photos import photo_bytes
from vitrine.compute import local_cluster, pack
from vitrine.curation import feature_nets, features
from vitrine.curation.features import FEATURES_FILE, accepted_features
from vitrine.data.shards import ShardWriter
from vitrine.images import load_square
from vitrine.ingest.photo_cache import PhotoCache
from vitrine.model.embeddings import DEDUPE_DIM, DEDUPE_SIZE, FEATURE_DIM, dedupe_embed, embed

BATCH = 4


def collected(root: Path, blobs: list[bytes]) -> pd.DataFrame:
    """A collect output of `blobs` under root (shards and the manifest's columns the feature
    pass reads), with one rejected row and one repeated photo."""
    rows = []
    with ShardWriter(root, "shards", per_shard=3) as writer:
        for i, data in enumerate(blobs):
            sha = hashlib.sha256(data).hexdigest()
            ref = writer.add(f"{sha}.jpg", data)
            rows.append(
                dict(
                    status="accepted",
                    sha256=sha,
                    shard=ref.shard,
                    offset=ref.offset,
                    length=ref.length,
                    id=f"p{i}",
                )
            )
    rows.append(dict(rows[0], id="again"))
    rows.append(dict(status="quarantined", sha256="", shard="", offset=0, length=0, id="bad"))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [photo_bytes(i) for i in range(7)]


def test_padding_keeps_the_rows_and_refuses_a_batch_too_large():
    pixels = np.ones((2, 3, 3, 3), dtype=np.uint8)
    out = feature_nets.padded(pixels, 5)
    assert out.shape == (5, 3, 3, 3) and (out[:2] == 1).all() and (out[2:] == 0).all()
    with pytest.raises(ValueError, match="3 photos in a batch of 2"):
        feature_nets.padded(np.zeros((3, 2, 2, 3), dtype=np.uint8), 2)


def test_onnx_runtime_computes_what_the_torch_networks_compute(photos):
    model = feature_nets.onnx_model()
    payload, ends = pack(photos[:3])
    rows = feature_nets.photo_features(payload, ends, model, feature_nets.model_digest(model), 3)
    small = np.stack([load_square(b, DEDUPE_SIZE) for b in photos[:3]])
    large = np.stack([load_square(b, feature_nets.EMBED_SIDE) for b in photos[:3]])
    assert rows.shape == (3, DEDUPE_DIM + FEATURE_DIM) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[:, :DEDUPE_DIM], dedupe_embed(small), atol=1e-5)
    np.testing.assert_allclose(rows[:, DEDUPE_DIM:], embed(large), atol=1e-5)


def test_a_photos_features_do_not_depend_on_the_others_in_its_batch(photos):
    model = feature_nets.onnx_model()
    digest = feature_nets.model_digest(model)
    together = feature_nets.photo_features(*pack(photos[:3]), model, digest, BATCH)
    alone = feature_nets.photo_features(*pack(photos[2:3]), model, digest, BATCH)
    np.testing.assert_array_equal(together[2:], alone)


@pytest.mark.slow
def test_dask_workers_and_a_cluster_by_address_give_the_in_process_features(
    tmp_path, photos, monkeypatch
):
    monkeypatch.setattr(features, "IN_PROCESS_BATCHES", 0)  # a local cluster even for 2 batches
    manifest = collected(tmp_path / "collected", photos)
    run = dict(
        manifest=manifest, collected=tmp_path / "collected", batch_size=BATCH, progress=False
    )
    here = accepted_features(**run, scheduler="synchronous")
    assert (here.computed, here.reused) == (7, 0) and len(here.descriptors) == 7
    assert len(here.row_photo) == 8 and here.row_photo[0] == here.row_photo[7]  # the repeated photo
    local = accepted_features(**run, scheduler="", n_workers=2)
    with local_cluster(2) as cluster:
        remote = accepted_features(**run, scheduler=cluster.scheduler_address)
    for other in (local, remote):
        np.testing.assert_array_equal(other.descriptors, here.descriptors)
        np.testing.assert_array_equal(other.embeddings, here.embeddings)


@pytest.mark.slow
def test_the_cache_answers_a_rerun_and_a_new_photo_alone_is_computed(tmp_path, photos):
    root = tmp_path / "collected"
    manifest = collected(root, photos)
    cache = tmp_path / "cache"
    first = accepted_features(
        manifest.iloc[:5], root, BATCH, cache, scheduler="", n_workers=2, progress=False, keep_s=9e4
    )
    assert (first.computed, first.reused) == (5, 0)
    again = accepted_features(
        manifest, root, BATCH, cache, scheduler="synchronous", progress=False, keep_s=9e4
    )
    assert (again.computed, again.reused) == (2, 5)
    clean = accepted_features(manifest, root, BATCH, scheduler="synchronous", progress=False)
    np.testing.assert_array_equal(again.descriptors, clean.descriptors)
    np.testing.assert_array_equal(again.embeddings, clean.embeddings)
    # The sources lose photos 1-4: after a run told to keep nothing unseen, the cache forgets them.
    later = accepted_features(
        manifest.iloc[5:], root, BATCH, cache, scheduler="synchronous", progress=False, keep_s=0
    )
    assert (later.computed, later.reused) == (0, 3)
    with PhotoCache(cache / FEATURES_FILE, later.version) as store:
        assert store.count() == 3 and set(store.get_many(later.digests.tolist())) == set(
            later.digests.tolist()
        )


@pytest.mark.slow
def test_a_few_new_photos_start_no_cluster_and_the_exported_networks_are_kept(
    tmp_path, photos, monkeypatch
):
    root = tmp_path / "collected"
    manifest = collected(root, photos)
    cache = tmp_path / "cache"
    first = accepted_features(manifest, root, BATCH, cache, scheduler="", progress=False)
    kept = cache / f"{features.MODEL_PREFIX}{first.version}.onnx"
    assert kept.is_file()

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a few photos")

    def no_export():
        raise AssertionError("the networks were exported again")

    monkeypatch.setattr(features.compute, "connect", no_cluster)
    monkeypatch.setattr(features.feature_nets, "onnx_model", no_export)
    (cache / features.FEATURES_FILE).unlink()  # every photo to compute again, in this process
    again = accepted_features(manifest, root, BATCH, cache, scheduler="", progress=False)
    np.testing.assert_array_equal(again.descriptors, first.descriptors)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
