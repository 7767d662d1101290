"""The GroceryStore variant (scripts/grocery.py, configs/grocery.yaml) on a tiny look-alike tar."""

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from scripts.grocery import (
    VARIANT,
    VariantError,
    catalog_rows,
    check_classes,
    extract_dataset,
    profile_path,
    profiles,
    set_up,
    taxonomy_labels,
    variant_overrides,
    write_variant_params,
)
from stages.collect import CollectConfig
from stages.dedupe import DedupeConfig
from stages.prepare import PrepareConfig
from stages.validate import ValidateConfig
from tests.helpers import REPO
from tests.helpers.photos import photo_bytes
from vitrine.config import load_params, stage_config
from vitrine.model.training import TrainConfig, candidate_config

CLASSES_CSV = (
    "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
    "Iconic Image Path (str),Product Description Path (str)\n"
    "Granny-Smith,0,Apple,0,/iconic-images-and-descriptions/Fruit/Apple/Granny-Smith/"
    "Granny-Smith_Iconic.jpg,/x.txt\n"
    "Avocado,1,Avocado,1,/iconic-images-and-descriptions/Fruit/Avocado/Avocado_Iconic.jpg,/x.txt\n"
    "Brown-Cap-Mushroom,2,Mushroom,2,/iconic-images-and-descriptions/Vegetables/Mushroom/"
    "Brown-Cap-Mushroom/Brown-Cap-Mushroom_Iconic.jpg,/x.txt\n"
)
LABELS = [
    "Fruit/Apple/Granny-Smith",
    "Fruit/Avocado/Avocado",
    "Vegetables/Mushroom/Brown-Cap-Mushroom",
]
# As published: the mushroom's train folder lacks the Mushroom level its test folder has.
FOLDERS = {
    ("train", 0): "train/Fruit/Apple/Granny-Smith",
    ("train", 1): "train/Fruit/Avocado",
    ("train", 2): "train/Vegetables/Brown-Cap-Mushroom",
    ("val", 0): "val/Fruit/Apple/Granny-Smith",
    ("val", 1): "val/Fruit/Avocado",
    ("val", 2): "val/Vegetables/Brown-Cap-Mushroom",
    ("test", 0): "test/Fruit/Apple/Granny-Smith",
    ("test", 1): "test/Fruit/Avocado",
    ("test", 2): "test/Vegetables/Mushroom/Brown-Cap-Mushroom",
}
PER_SPLIT = {"train": 8, "val": 2, "test": 4}  # photos per class


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def grocery_tar(tmp_path: Path) -> Path:
    """A GroceryStore look-alike: 14 photos per class, lists, classes.csv, an iconic image."""
    path = tmp_path / "grocery-store.tar"
    seed = 0
    with tarfile.open(path, "w") as tar:
        _add(tar, "LICENSE", b"MIT License\n")
        _add(tar, "dataset/classes.csv", CLASSES_CSV.encode())
        _add(tar, "dataset/iconic-images-and-descriptions/Fruit/Avocado/a.jpg", photo_bytes(999))
        for split, n in PER_SPLIT.items():
            lines = []
            for fine_id in range(3):
                for i in range(n):
                    seed += 1
                    photo = f"{FOLDERS[split, fine_id]}/{i:03d}.jpg"
                    _add(tar, f"dataset/{photo}", photo_bytes(seed))
                    lines.append(f"{photo}, {fine_id}, {fine_id}")
            _add(tar, f"dataset/{split}.txt", ("\n".join(lines) + "\n").encode())
    return path


def test_taxonomy_gives_every_class_three_levels(grocery_tar, tmp_path):
    extract_dataset(grocery_tar, tmp_path / "data")
    labels = taxonomy_labels(tmp_path / "data" / "dataset" / "classes.csv")
    assert [labels[i] for i in range(3)] == LABELS


def test_catalog_follows_the_published_lists_and_class_ids(grocery_tar, tmp_path):
    data = tmp_path / "data"
    extract_dataset(grocery_tar, data)
    rows = pd.DataFrame(catalog_rows(data / "dataset"))
    assert len(rows) == 3 * sum(PER_SPLIT.values())
    assert rows.groupby("split").size().to_dict() == {k: 3 * v for k, v in PER_SPLIT.items()}
    # the label comes from the class id, whatever folder the photo is in
    mushrooms = rows[rows["id"].str.contains("Brown-Cap-Mushroom")]
    assert set(mushrooms["label"]) == {"Vegetables/Mushroom/Brown-Cap-Mushroom"}
    assert all((data / p).is_file() for p in rows["path"])


def test_only_photos_lists_and_licence_are_extracted_once(grocery_tar, tmp_path):
    data = tmp_path / "data"
    extract_dataset(grocery_tar, data)
    assert (data / "LICENSE").is_file() and (data / "dataset" / "train.txt").is_file()
    assert not (data / "dataset" / "iconic-images-and-descriptions").exists()
    grocery_tar.unlink()
    extract_dataset(grocery_tar, data)  # already there: the tar is not needed again
    with pytest.raises(VariantError, match="GROCERY_TAR"):
        extract_dataset(grocery_tar, tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("train/x.jpg, 0", "expected 'path, fine_id, coarse_id'"),
        ("train/x.jpg, 7, 0", "class id 7"),
    ],
)
def test_malformed_lists_are_refused(grocery_tar, tmp_path, line, message):
    data = tmp_path / "data"
    extract_dataset(grocery_tar, data)
    (data / "dataset" / "val.txt").write_text(line + "\n")
    with pytest.raises(VariantError, match=message):
        catalog_rows(data / "dataset")


def test_class_list_must_match_the_dataset():
    rows = [{"label": label} for label in LABELS]
    check_classes(LABELS, rows)
    with pytest.raises(VariantError, match=r"not listed \['Fruit/Avocado/Avocado'\]"):
        check_classes([LABELS[0], LABELS[2], "Fruit/Kiwi/Kiwi"], rows)


def test_overrides_refuse_keys_params_yaml_lacks(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text("classes: [a, b]\nprepare:\n  split: hash  # why\n  seed: 42\n")
    with pytest.raises(VariantError, match=r"params\.yaml has no key 'prepare\.splitt'"):
        write_variant_params(base, {"prepare.splitt": "column"}, tmp_path / "typo.yaml")
    out = tmp_path / "variant.yaml"
    write_variant_params(base, {"classes": ["x/y/z"], "prepare.split": "column"}, out)
    assert yaml.safe_load(out.read_text()) == {
        "classes": ["x/y/z"],
        "prepare": {"split": "column", "seed": 42},
    }
    assert "# why" in out.read_text()  # params.yaml's comments are kept


def test_the_variant_applies_to_params_yaml_and_loads_into_every_data_stage(tmp_path):
    out = tmp_path / "params.yaml"
    write_variant_params(REPO / "params.yaml", yaml.safe_load(VARIANT.read_text()), out)
    params = load_params(out)
    classes = params["classes"]
    assert len(classes) == 81 and all(c.count("/") == 2 for c in classes)
    assert len({c.rsplit("/", 1)[0] for c in classes}) == 43  # coarse: the first two levels
    assert set(params["evaluate"]["business_value"]) == set(classes)
    assert params["collect"]["sources"] == [{"kind": "catalog", "path": "catalog.csv"}]
    for cls, block in [
        (CollectConfig, "collect"),
        (ValidateConfig, "validate"),
        (DedupeConfig, "dedupe"),
        (PrepareConfig, "prepare"),
    ]:
        stage_config(cls, block, params)
    assert stage_config(PrepareConfig, "prepare", params).split == "column"


def test_a_profile_sets_its_keys_over_the_variants_and_trains(tmp_path):
    assert [p.name for p in profiles()] == ["grocery-gpu.yaml"]
    with pytest.raises(VariantError, match=r"no profile 'tpu'.*known: \['gpu'\]"):
        profile_path("tpu")
    variant = variant_overrides(VARIANT)
    overrides = variant_overrides(VARIANT, profile_path("gpu"))
    out = tmp_path / "params.yaml"
    write_variant_params(REPO / "params.yaml", overrides, out)
    params = load_params(out)
    assert params["classes"] == variant["classes"]  # the variant's keys the profile leaves
    assert params["prepare"]["split"] == "column"
    # a key both set takes the profile's value
    assert variant["candidates.effnet_finetune.input_size"] == 224
    finetune = candidate_config(params, "effnet_finetune")
    assert (finetune.model, finetune.input_size, finetune.train_input_size) == (
        "effnet_lite1",
        320,
        0,
    )
    train = stage_config(TrainConfig, "train", params)
    assert (train.trainer["accelerator"], train.augment_on) == ("gpu", "device")
    for name in params["candidates"]:
        candidate_config(params, name)


@pytest.mark.slow
def test_workspace_runs_the_data_stages_on_the_published_split(grocery_tar, tmp_path):
    variant = yaml.safe_load(VARIANT.read_text())
    variant.update(
        {
            "classes": LABELS,
            "evaluate.business_value": dict.fromkeys(LABELS, 1.0),
            "validate.min_images_per_class": 10,
        }
    )
    (tmp_path / "variant.yaml").write_text(yaml.safe_dump(variant))
    workspace = tmp_path / "ws"
    assert set_up(REPO, workspace, grocery_tar, tmp_path / "variant.yaml") == 42
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["dvc", "repro", "prepare"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prepared = pd.read_parquet(workspace / "data/prepared/manifest.parquet")
    assert set(prepared["label"]) == set(LABELS)
    assert (prepared["split"] == prepared["id"].str.split("/").str[0]).all()
    # a second set-up changes nothing DVC tracks
    set_up(REPO, workspace, grocery_tar, tmp_path / "variant.yaml")
    status = subprocess.run(
        ["dvc", "status", "prepare"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout
