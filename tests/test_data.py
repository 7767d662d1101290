"""The data module: augmentation on train only, imbalance handling, reproducible epochs."""

import numpy as np
import pytest
import torch

from tests.helpers.tiny_prepared import CLASSES, write_prepared
from vitrine.data.layout import load_split, prepared_resize, write_preprocessing
from vitrine.data.splits import (
    PackedDataModule,
    balanced_sampler,
    class_weights,
)

FLIP = [{"name": "HorizontalFlip", "p": 1.0}]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """One phone for every three laptops in every split."""
    return write_prepared(tmp_path_factory.mktemp("imbalanced"), phone_share=0.25)


def data_module(prepared, augment=None, **kwargs) -> PackedDataModule:
    data = PackedDataModule(prepared, list(CLASSES), batch_size=8, augment=augment, **kwargs)
    data.setup()
    return data


def test_params_augmentations_change_train_images_only(prepared):
    data = data_module(prepared, FLIP)
    train_images, train_labels = load_split(prepared, "train", list(CLASSES))
    image, label = data.train_set[3]
    assert np.array_equal(image, train_images[3][:, ::-1])
    assert label == train_labels[3]
    val_images, val_labels = load_split(prepared, "val", list(CLASSES))
    batches = list(data.val_dataloader())
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.from_numpy(np.array(val_images)))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(val_labels))


def test_augmentation_arguments_come_from_params(prepared):
    crop = [{"name": "RandomResizedCrop", "size": [24, 24], "scale": [0.5, 1.0], "p": 1.0}]
    images, labels = next(iter(data_module(prepared, crop).train_dataloader()))
    assert images.shape == (8, 24, 24, 3) and images.dtype == torch.uint8
    assert labels.shape == (8,) and labels.dtype == torch.int64


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="unknown albumentations transform 'HorizontalFlop'"):
        PackedDataModule("unused", list(CLASSES), 8, augment=[{"name": "HorizontalFlop"}])


def test_unknown_imbalance_option_is_named():
    with pytest.raises(ValueError, match="imbalance must be one of"):
        PackedDataModule("unused", list(CLASSES), 8, imbalance="oversample")


def test_loss_weights_are_inverse_class_frequency(imbalanced):
    # 32 training photos, 24 laptops and 8 phones: n / (k * n_c) = 32/48 and 32/16.
    assert data_module(imbalanced).train_class_weights() == pytest.approx([2 / 3, 2.0])
    assert class_weights(np.array([0, 0, 0, 1, 2, 2]), 3) == pytest.approx([2 / 3, 2.0, 1.0])


def test_a_class_without_training_photos_is_named():
    with pytest.raises(ValueError, match=r"class index\(es\) \[1\] have no training photo"):
        class_weights(np.array([0, 0, 2]), 3)


def test_balanced_sampler_draws_classes_about_equally(imbalanced):
    data = data_module(imbalanced, imbalance="balanced_sampler")
    drawn = torch.cat([y for epoch in range(20) for _, y in data.train_dataloader()])
    assert len(drawn) == 20 * 32
    assert 0.45 < drawn.float().mean().item() < 0.55  # phones: 25% of the photos
    labels = np.array([0] * 90 + [1] * 10)
    draws = np.array(list(balanced_sampler(labels, torch.Generator().manual_seed(0))))
    assert len(draws) == 100 and 0.35 < labels[draws].mean() < 0.65


def flipped(batch: torch.Tensor, originals: torch.Tensor) -> list[bool]:
    return [not torch.equal(x, o) for x, o in zip(batch, originals, strict=True)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_depends_only_on_its_seed(prepared, num_workers):
    """What a resumed run relies on: after reseed(s), an epoch's order and augmentations are the
    same whatever ran before, with or without loader worker processes."""
    data = data_module(prepared, [{"name": "HorizontalFlip", "p": 0.5}], num_workers=num_workers)

    def epoch(seed):
        data.reseed(seed)
        return [(x, y) for x, y in data.train_dataloader()]

    first = epoch(3)
    epoch(4)
    again = epoch(3)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(4), strict=True))


def test_loader_workers_augment_independently(tmp_path):
    """Each worker holds a copy of the augmentation: seeded alike, they would flip alike."""
    root = write_prepared(tmp_path, split_sizes={"train": 64, "val": 8, "test": 8})
    images, _ = load_split(root, "train", list(CLASSES))
    data = data_module(root, [{"name": "HorizontalFlip", "p": 0.5}], num_workers=2)
    data.train_set.images = np.repeat(images[:1], 64, axis=0)  # one photo, so order is moot
    first, second = [x for x, _ in data.train_dataloader()][:2]  # from workers 0 and 1
    original = torch.from_numpy(images[:1].copy()).expand(8, -1, -1, -1)
    assert flipped(first, original) != flipped(second, original)


def test_a_prepared_set_names_its_resize_rule_and_an_older_one_squeezed(tmp_path):
    assert prepared_resize(tmp_path) == "squeeze"  # prepared before the rule was recorded
    write_preprocessing(tmp_path, 128, "letterbox")
    assert prepared_resize(tmp_path) == "letterbox"
