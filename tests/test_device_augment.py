"""augment_on device: kornia augments whole batches where the network trains (here the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tiny_prepared import CLASSES, candidate_params, train_params, write_prepared
from vitrine.config import ConfigError, from_mapping, stage_config
from vitrine.data.batches import DeviceAugmentedData, PackedBatches, photo_data
from vitrine.data.device_augment import build_device_augment
from vitrine.data.layout import load_split
from vitrine.data.splits import PackedDataModule
from vitrine.model.training import CandidateConfig, TrainConfig, train

# effnet_finetune's list in params.yaml, at the tiny photos' size.
FINETUNE = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "RandomResizedCrop", "size": [24, 24], "scale": [0.6, 1.0], "p": 1.0},
    {"name": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02},
]


def photos(n: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=generator)


def augmented(steps: list[dict], batch: torch.Tensor, seed: int) -> torch.Tensor:
    augment = build_device_augment(steps)
    assert augment is not None
    torch.manual_seed(seed)
    return augment(batch)


def test_a_batch_comes_back_as_uint8_photos_of_the_cropped_size():
    batch = photos()
    out = augmented(FINETUNE, batch, seed=0)
    assert out.shape == (8, 24, 24, 3) and out.dtype == torch.uint8 and out.device == batch.device
    # Pixels stay pixels: not collapsed to a constant, spread over the range like the input.
    assert out.float().std() > 40 and out.min() < 20 and out.max() > 235


def test_transforms_act_as_their_albumentations_namesakes():
    batch = photos()
    assert torch.equal(augmented([{"name": "HorizontalFlip", "p": 1.0}], batch, 0), batch.flip(2))
    # Never applied: the photos come back exactly (the float round trip loses nothing).
    untouched = [{"name": "HorizontalFlip", "p": 0.0}, {"name": "ColorJitter", "p": 0.0}]
    assert torch.equal(augmented(untouched, batch, 0), batch)
    # p 0.5: each photo draws its own flip.
    flipped = augmented([{"name": "HorizontalFlip"}], photos(64), 0)
    changed = [not torch.equal(a, b) for a, b in zip(flipped, photos(64), strict=True)]
    assert 10 < sum(changed) < 54
    assert build_device_augment([]) is None


def test_the_seed_decides_the_augmentation():
    batch = photos()
    first = augmented(FINETUNE, batch, seed=3)
    assert torch.equal(augmented(FINETUNE, batch, seed=3), first)
    assert not torch.equal(augmented(FINETUNE, batch, seed=4), first)


def test_a_transform_without_a_device_equivalent_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'GaussNoise' has no device \(kornia\) equivalent"):
        build_device_augment([{"name": "GaussNoise", "p": 0.5}])
    with pytest.raises(ValueError, match=r"HorizontalFlip .*'probability'"):
        build_device_augment([{"name": "HorizontalFlip", "probability": 0.5}])
    with pytest.raises(ValueError, match="augment_on must be one of"):
        photo_data("gpu", "unused", list(CLASSES), 8, 0, [], 0, "none")
    params = {"classes": list(CLASSES), "train": train_params(augment_on="gpu")}
    with pytest.raises(ConfigError, match="augment_on"):
        stage_config(TrainConfig, "train", params)


def test_the_loader_reads_whole_unaugmented_batches(tmp_path):
    prepared = write_prepared(tmp_path)
    data = photo_data("device", prepared, list(CLASSES), 8, 0, FINETUNE, 0, "none")
    assert isinstance(data, DeviceAugmentedData)
    data.setup()
    assert isinstance(data.train_set, PackedBatches)
    images, labels = load_split(prepared, "train", list(CLASSES))
    wanted = [5, 1, 30, 1]  # any order, repeats (the balanced sampler draws with replacement)
    batch, batch_labels = data.train_set.__getitems__(wanted)
    assert batch.dtype == torch.uint8 and torch.equal(batch, torch.from_numpy(images[wanted]))
    assert torch.equal(batch_labels, torch.from_numpy(labels[wanted]))
    drawn = torch.cat([x for x, _ in data.train_dataloader()])
    assert drawn.shape == (32, 32, 32, 3)  # the photos, in the epoch's order, as they are
    assert sorted(map(bytes, drawn.numpy())) == sorted(map(bytes, images))
    host = PackedDataModule(prepared, list(CLASSES), 8)
    host.setup()
    for (x, y), (hx, hy) in zip(data.val_dataloader(), host.val_dataloader(), strict=True):
        assert torch.equal(x, hx) and torch.equal(y, hy)


def fit(prepared, tmp_path, augment_on: str, seed: int = 7) -> dict:
    config = stage_config(
        TrainConfig,
        "train",
        {"classes": list(CLASSES), "train": train_params(seed=seed, augment_on=augment_on)},
    )
    augment = [{**step, "size": [32, 32]} if "size" in step else step for step in FINETUNE]
    candidate = from_mapping(CandidateConfig, candidate_params(max_epochs=2, augment=augment))
    return train(config, candidate, prepared, tmp_path / "work", tmp_path / "live").metrics


def test_a_candidate_trains_with_device_augmentation_reproducibly(tmp_path):
    prepared = write_prepared(tmp_path / "data")
    first = fit(prepared, tmp_path / "a", "device")
    assert first["epochs"] == 2 and set(first["final"]) >= {"train_loss", "val_acc"}
    again = fit(prepared, tmp_path / "b", "device")
    assert again["final"] == first["final"]
    assert fit(prepared, tmp_path / "c", "device", seed=8)["final"] != first["final"]


def test_host_augmentation_is_the_default():
    params = {"classes": list(CLASSES), "train": train_params()}
    assert stage_config(TrainConfig, "train", params).augment_on == "host"
    data = photo_data("host", "unused", list(CLASSES), 8, 0, FINETUNE, 0, "none")
    assert type(data) is PackedDataModule and data.augment is not None
    assert data.augment(image=np.zeros((32, 32, 3), np.uint8))["image"].shape == (24, 24, 3)
