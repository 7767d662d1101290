"""Package: evaluate's winner as TorchScript and ONNX models, promoted to the BentoML store and
a Bento only when it beats the model deployed now.

Reads  <paths.evaluate_report> (evaluate: the winner, its test scores, the abstain threshold),
       <paths.model>/<winner>/best.ckpt and model.json (train), <paths.served>/<winner>/
       (evaluate: model.onnx as it scored it, and its precision), the prepared test photos, the
       evaluate: block (primary metric, value model, promote_margin) and serve: block of
       params.yaml (with the shipped candidate's serve.by_candidate entry over it), dvc.lock
       (the prepared data's md5) and the git revision.
Writes <paths.package>/model.pt  the scripted Predictor: uint8 (N, H, W, 3) -> logits, checked
                                 against the eager one before anything is written;
       <paths.package>/model.onnx evaluate's served model, as it is: the Predictor after its
                                 resize for ONNX Runtime (what the service runs, behind the
                                 same resize), in float or int8 (vitrine.model.export);
       <paths.package>/model.json classes, image_size, model, candidate, input_size,
                                 model_version, weights_version, precision, calibration
                                 (evaluate's fit, baked into model.onnx), metrics (the
                                 winner's test scores),
                                 abstain_threshold, class_thresholds and backoff (the decision
                                 rule evaluate fitted: vitrine.runtime.decisions), serve (the
                                 service's limits: the Bento has no params.yaml) and card
                                 (params, data version, git revision);
       <paths.package>/model_card.md the same card for people;
       <paths.promotion>          the decision (vitrine.evaluation.promotion), why, and both
                                 models' scores.
The challenger (the winner) and the champion (<package.model_name>:latest in the BentoML model
store, $BENTOML_HOME, <repo>/.bentoml when unset) are scored on the same test photos. Promoted:
the package folder goes to the store as <package.model_name>:<model_version> and, with
package.build_bento, bentofile.yaml's Bento is built. Kept: <paths.package> gets the champion's
files instead, so the DVC output is always the deployed model; its model.json takes the current
serve: block for its candidate (re-saved to the store under the same version when that
changed), and the Bento is built again around it, since the service code or its settings may
be what changed.

The folder and its version: vitrine.packaging.bundle; the store and the Bento:
vitrine.packaging.store; the decision: vitrine.evaluation.promotion.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitrine.config import load_params, load_paths, params_block, run_cli, stage_config
from vitrine.contracts import MODEL_NAME_ENV, read_evaluation, write_promotion
from vitrine.evaluation.promotion import challenge, describe
from vitrine.evaluation.settings import check_config, load_config
from vitrine.evaluation.thresholds import backoff_levels
from vitrine.packaging.bundle import export_package, provenance, serve_settings
from vitrine.packaging.store import build_bento, champion_folder, keep_champion, save_to_store

BENTOFILE = Path("bentofile.yaml")


@params_block
class PackageConfig:
    model_name: str  # name in the BentoML model store; the service loads <model_name>:latest
    build_bento: bool


def main() -> None:
    params = load_params()
    cfg = stage_config(PackageConfig, "package", params)
    evaluation = load_config(params)
    paths = load_paths(params)
    os.environ.setdefault("BENTOML_HOME", str(Path.cwd() / ".bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ[MODEL_NAME_ENV] = cfg.model_name  # read by the service when the Bento is built
    report = read_evaluation(paths.evaluate_report)
    winner = report.winner
    values = check_config(evaluation)
    info = export_package(
        paths.model / winner,
        paths.served / winner,
        report,
        paths.package,
        serve_settings(params, winner),
        provenance(params, paths.prepared, Path.cwd()),
        values.decision_gain(),
        values.gain(),
        values.review_cost,
        backoff_levels(values.classes, evaluation.taxonomy),
    )
    champion = champion_folder(cfg.model_name)
    promotion = challenge(paths.package, champion, paths.prepared, evaluation)
    print(f"package: {'promoted' if promotion.promoted else 'kept'}: {promotion.reason}")
    if promotion.promoted:
        tag = save_to_store(paths.package, cfg.model_name)
        print(f"package: saved model {tag} ({info.model}, {len(info.classes)} classes)")
    elif champion is not None:  # kept: the deployed model under the current serve: block
        kept = serve_settings(params, describe(champion).candidate)
        if keep_champion(champion, paths.package, kept):
            tag = save_to_store(paths.package, cfg.model_name)  # the same version, replaced
            print(f"package: saved model {tag} again under the current serve: settings")
    if cfg.build_bento:  # also when kept: the service code may be what changed
        print(f"package: built Bento {build_bento(BENTOFILE, Path.cwd())}")
    write_promotion(promotion, paths.promotion)


if __name__ == "__main__":
    run_cli(main)
