"""Heat maps for the moderators' review queue, drawn on the float network.

`python -m pipeline.heatmaps [PROJECT_DIR] [--package DIR] [--limit N]` ranks the recorded
answers as the review page does (vitrine.production.queue, under the packaged model's value
model; the answers database is the package's serve.record.url, VITRINE_RECORD_URL overriding
it), and for each of the first N (default 500, the most one queue request shows) draws two
Grad-CAM heat maps (vitrine.evaluation.heatmaps) over its photo: one for the class the model
answered, one for the declared category or the runner-up (vitrine.production.heatmaps.targets;
the true class is what the review is for). It writes them as PNGs beside the photo store:

  <serve.record.photos>-heatmaps/<weights version>/<sha256>.<class index>.png

where the service finds and serves them (GET /review/heatmap/<request_id>/<which>). Maps
already drawn are kept, so a re-run draws only the new answers'; maps whose photo the photo
store's retention deleted are removed. Every queued answer is accounted for: drawn, drawn
before, or left out with its reason (photo_missing: retention deleted it; the service's refusal
code for a photo it cannot decode; no_convolution: a network without Conv2d).

The network is the package's model.pt (the float network, whatever precision model.onnx has:
int8 has no gradients), rebuilt as the eager Predictor its weights came from (model.json's
architecture, model.pt's state dict) and checked against model.json's weights_version. The
service runs model.onnx: for an int8 model its answers can differ from the float network's on a
few photos (evaluate.json served.*.int8), which is why the page names the float network.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from tqdm import tqdm

from pipeline.feedback import FeedbackError, database_url
from vitrine.config import ConfigError, load_params, load_paths, run_cli
from vitrine.contracts import SCRIPTED_MODEL_FILE, PackagedModel, TrainedModel, read_packaged
from vitrine.evaluation.heatmaps import class_heat_maps, last_conv_name
from vitrine.images import Rejected
from vitrine.model.networks import Predictor, build_predictor
from vitrine.packaging.bundle import weights_version
from vitrine.production.heatmaps import (
    NETWORK,
    heatmap_path,
    heatmap_root,
    prune,
    targets,
    write_map,
)
from vitrine.production.queue import ReviewTerms, review_queue
from vitrine.production.records import RecordStore
from vitrine.runtime.answers import model_input

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIMIT = 500  # answers of the queue: service/review.py's MAX_LIMIT, one request's most
SIDE = 128  # px, the longer side of a map: the 128 px square the network sees (prepare)
CHUNK = 32  # maps per Grad-CAM call (vitrine.evaluation.heatmaps batches within it)
PHOTO_MISSING = "photo_missing"  # the photo store's retention deleted the photo
NO_CONVOLUTION = "no_convolution"  # the network has no Conv2d to draw from
SHOWN = 20  # answers left out, printed one a line


class HeatmapError(RuntimeError):
    """The maps cannot be drawn at all: no package, no database, a model.pt unlike model.json."""


def packaged_predictor(package: Path, info: PackagedModel) -> Predictor:
    """The package's float network as an eager Predictor (Grad-CAM hooks its layers, which a
    TorchScript module does not allow): model.json's architecture with model.pt's weights,
    refused unless they hash to model.json's weights_version."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            scripted = torch.jit.load(str(package / SCRIPTED_MODEL_FILE), map_location="cpu")
        predictor = build_predictor(info.model, len(info.classes), info.input_size)
        predictor.load_state_dict(scripted.state_dict())
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise HeatmapError(f"{package / SCRIPTED_MODEL_FILE}: {err}") from err
    trained = TrainedModel(info.model, info.classes, info.image_size, info.input_size)
    if info.weights_version and weights_version(predictor, trained) != info.weights_version:
        raise HeatmapError(
            f"{package / SCRIPTED_MODEL_FILE} is not the network model.json describes "
            f"(weights_version {info.weights_version})"
        )
    return predictor.eval()


@dataclass(frozen=True)
class Job:
    """One map to draw."""

    request_id: str
    photo: np.ndarray  # the square the network sees, uint8 (S, S, 3)
    class_index: int
    path: Path


def draw_queue(
    store: RecordStore,
    info: PackagedModel,
    predictor: Predictor,
    photos: Path,
    limit: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """Prune the maps of deleted photos, then draw those of the first `limit` queued answers
    that are not drawn yet; the report (see the module's docstring)."""
    root, version = heatmap_root(photos), info.weights
    pruned = prune(root, photos)
    queued = [r.answer for r in review_queue(store, ReviewTerms.of(info), limit)]
    try:
        layer = last_conv_name(predictor.net)
    except ValueError as err:
        layer, unusable = "", str(err)
    else:
        unusable = ""
    jobs: list[Job] = []
    left_out: list[dict[str, str]] = []
    drawn_before = 0
    for answer in queued:
        wanted = [
            (t.class_index, heatmap_path(root, version, answer.image_sha256, t.class_index))
            for t in targets(answer, info.classes)
        ]
        wanted = [(i, path) for i, path in wanted if not path.is_file()]
        if not wanted:
            drawn_before += 1
            continue
        reason = NO_CONVOLUTION if unusable else ""
        detail = unusable
        if not reason:
            try:
                data = (photos / answer.image_sha256[:2] / answer.image_sha256).read_bytes()
                square = model_input(data, info)
            except FileNotFoundError:
                reason, detail = PHOTO_MISSING, "the photo store no longer keeps the photo"
            except Rejected as err:
                reason, detail = err.code, err.detail
        if reason:
            left_out.append({"request_id": answer.request_id, "reason": reason, "detail": detail})
            continue
        jobs += [Job(answer.request_id, square, i, path) for i, path in wanted]
    with tqdm(total=len(jobs), desc="heat maps", unit="map") as bar:
        for start in range(0, len(jobs), CHUNK):
            chunk = jobs[start : start + CHUNK]
            images = np.stack([j.photo for j in chunk])
            pngs = class_heat_maps(predictor, images, {"map": [j.class_index for j in chunk]}, SIDE)
            for job, png in zip(chunk, pngs["map"], strict=True):
                write_map(job.path, png)
            bar.update(len(chunk))
    return {
        "network": NETWORK,
        "weights_version": version,
        "layer": layer,
        "folder": str(root / version),
        "queued": len(queued),
        "drawn": len({j.request_id for j in jobs}),
        "maps_written": len(jobs),
        "drawn_before": drawn_before,
        "left_out": len(left_out),
        "by_reason": dict(Counter(m["reason"] for m in left_out)),
        "pruned": pruned,
        "missing": left_out,
    }


def _within(project_dir: Path, path: str | Path) -> Path:
    return Path(path) if Path(path).is_absolute() else project_dir / path


def draw_from_params(
    project_dir: Path, package: Path | None = None, limit: int = DEFAULT_LIMIT
) -> dict[str, Any]:
    """draw_queue for the project's packaged model (paths.package, or `package`), its answers
    database and photo store as the service reads them from the project folder."""
    if package is None:
        package = _within(project_dir, load_paths(load_params(project_dir / "params.yaml")).package)
    try:
        info = read_packaged(package)
    except (OSError, ValueError) as err:
        raise HeatmapError(f"no packaged model at {package}: {err}") from err
    record = info.serve.record
    if not record.enabled:
        raise HeatmapError("serve.record.enabled is false: no answers are recorded")
    predictor = packaged_predictor(package, info)
    try:
        store = RecordStore(database_url(record.url, project_dir))
    except (FeedbackError, ValueError, sa.exc.ArgumentError) as err:
        raise HeatmapError(f"answers database: {err}") from err
    try:
        if not all(sa.inspect(store.engine).has_table(t) for t in ("answers", "reviews")):
            raise HeatmapError(
                f"answers database {store!r} has no recorded answers: the service creates its "
                "tables when it starts with serve.record enabled"
            )
        return draw_queue(store, info, predictor, _within(project_dir, record.photos), limit)
    except sa.exc.SQLAlchemyError as err:
        # The driver's own line, not SQLAlchemy's statement dump and background link.
        cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise HeatmapError(f"answers database {store!r}: {type(err).__name__}: {cause}") from err
    finally:
        store.close()


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """What the run did, for a terminal or a run log: counts, then each answer left out."""
    lines = [
        f"heatmaps: {report['queued']} queued answer(s) on the {report['network']} "
        f"{report['weights_version']}: {report['drawn']} drawn ({report['maps_written']} maps), "
        f"{report['drawn_before']} drawn before, {report['left_out']} left out"
        f"{' ' + str(report['by_reason']) if report['by_reason'] else ''}; "
        f"{report['pruned']} map(s) of deleted photos removed; "
        f"in {report['folder']}"
    ]
    lines += [
        f"  left out: {m['request_id']}: {m['reason']} ({m['detail']})"
        for m in report["missing"][:SHOWN]
    ]
    if len(report["missing"]) > SHOWN:
        lines.append(f"  ... and {len(report['missing']) - SHOWN} more")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Draw Grad-CAM heat maps (float network) for the review queue's photos."
    )
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    parser.add_argument("--package", type=Path, help="the packaged model (default paths.package)")
    parser.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help="queued answers to draw for"
    )
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        report = draw_from_params(args.project_dir.resolve(), args.package, args.limit)
    except (HeatmapError, ConfigError) as err:
        print(f"heatmaps: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    run_cli(main)
