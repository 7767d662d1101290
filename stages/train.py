"""train: fit one candidate network with Lightning (`python -m stages.train <candidate>`).

dvc.yaml runs one stage per entry of params.yaml's `candidates` block (train@<candidate>);
vitrine.model.training does the fitting. Writes <paths.model>/<candidate>/best.ckpt + model.json
(vitrine.contracts.TrainedModel), <paths.train_reports>/<candidate>.json and DVCLive's per-epoch
metrics under <paths.train_live>/<candidate>. Checkpoints are written to
<paths.train_resume>/<candidate>/<fingerprint>/ first, outside DVC's outputs: a run killed
mid-training and started again resumes from its last epoch there, provided params and prepared
data are unchanged (the fingerprint).
"""

from __future__ import annotations

import shutil
import sys

from vitrine.config import load_params, load_paths, run_cli, stage_config
from vitrine.model.training import (
    TrainConfig,
    candidate_config,
    model_card,
    publish,
    run_fingerprint,
    train,
)


def main(argv: list[str] | None = None) -> None:
    (name,) = argv if argv is not None else sys.argv[1:]
    params = load_params()
    paths = load_paths(params)
    config = stage_config(TrainConfig, "train", params)
    candidate = candidate_config(params, name)
    workdir = paths.train_resume / name / run_fingerprint(config, candidate, paths.prepared)
    result = train(config, candidate, paths.prepared, workdir, paths.train_live / name)
    if not result.is_global_zero:
        return
    card = model_card(config, candidate, paths.prepared)
    publish(result, card, paths.model / name, paths.train_reports / f"{name}.json")
    shutil.rmtree(workdir)  # finished: a later run of the same params starts afresh
    print(f"train: {name}: {result.metrics} (written by rank 0)")


if __name__ == "__main__":
    run_cli(main)
