"""The BentoML model store (the deployed model is <name>:latest) and the Bento around it.

The store is $BENTOML_HOME's (the package stage points it at <repo>/.bentoml when unset); tests
pass their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import bentoml
from bentoml.exceptions import NotFound

from vitrine.contracts import (
    PACKAGE_FILES,
    PackagedModel,
    ServeConfig,
    packaged_metadata,
    read_packaged,
    write_packaged,
)

if TYPE_CHECKING:
    from bentoml._internal.models import ModelStore


class _InStore(TypedDict, total=False):
    """bentoml.models' keyword argument for a store other than $BENTOML_HOME's."""

    _model_store: ModelStore


def _in_store(store: ModelStore | None) -> _InStore:
    return {} if store is None else {"_model_store": store}


def store_labels(info: PackagedModel) -> dict[str, str]:
    """BentoML labels (strings only): the model, its classes and its scalar test metrics."""
    labels = {"model": info.model, "candidate": info.candidate, "classes": ",".join(info.classes)}
    for key, value in info.metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            labels[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
    return labels


def save_to_store(package_dir: Path, name: str, store: ModelStore | None = None) -> bentoml.Tag:
    """Save the package folder as model `<name>:<model_version>`; returns its bentoml Tag.

    `store`: None means the one in $BENTOML_HOME. An existing model of the same version is
    replaced, so that it becomes :latest again.
    """
    info = read_packaged(package_dir)
    tag = bentoml.Tag(name, info.model_version)
    where = _in_store(store)
    with contextlib.suppress(NotFound):
        bentoml.models.delete(tag, **where)
    with bentoml.models.create(
        tag, labels=store_labels(info), metadata=packaged_metadata(info), **where
    ) as model:
        for filename in PACKAGE_FILES:
            shutil.copy2(package_dir / filename, model.path_of(filename))
    return model.tag


def champion_folder(name: str, store: ModelStore | None = None) -> Path | None:
    """The folder of <name>:latest in the model store (the deployed model), None if none."""
    where = _in_store(store)
    try:
        return Path(bentoml.models.get(f"{name}:latest", **where).path)
    except NotFound:
        return None


def keep_champion(champion_dir: Path, out_dir: Path, serve: ServeConfig) -> bool:
    """The champion's files into the package folder (the DVC output is the deployed model), its
    model.json under `serve` (the current serve: block for its candidate): serving limits are
    deployment settings, and a change to them must reach the deployed model even when no new
    model wins. Returns whether the block changed, i.e. whether the stored champion must be
    saved again."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for filename in PACKAGE_FILES:
        shutil.copy2(champion_dir / filename, out_dir / filename)
    info = read_packaged(out_dir)
    if info.serve == serve:
        return False
    write_packaged(dataclasses.replace(info, serve=serve), out_dir)
    return True


def build_bento(bentofile: Path, build_ctx: Path) -> bentoml.Tag:
    """Build the Bento (the service code, pinned to the stored model it loads) in $BENTOML_HOME."""
    return bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(build_ctx)).tag
