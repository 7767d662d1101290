"""The linear probe on cached features: the backbone runs once per photo and view, and what
training leaves is still the whole network, which ONNX exports and scores alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_prepared import CLASSES, candidate_params, train_params, write_prepared
from vitrine.config import from_mapping, stage_config
from vitrine.data.layout import load_split
from vitrine.model.embeddings import load_backbone
from vitrine.model.export import export_onnx
from vitrine.model.networks import ImageClassifier, build_predictor
from vitrine.model.probe import FeatureViews, flip_probability, frozen_features
from vitrine.model.training import CandidateConfig, TrainConfig, train
from vitrine.runtime.onnx import OnnxPredictor

PROBE = {"model": "effnet_lite0", "options": {"mode": "probe"}, "input_size": 32}
SIZES = {"train": 24, "val": 16, "test": 8}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"), split_sizes=SIZES)


def test_cached_features_are_what_the_network_computes_before_its_head(prepared):
    torch.manual_seed(0)
    predictor = build_predictor("effnet_lite0", len(CLASSES), 32, {"mode": "probe"}).eval()
    images, _ = load_split(prepared, "val", list(CLASSES))
    features = frozen_features(predictor, images, False, CPU, "val")
    flipped = frozen_features(predictor, images, True, CPU, "val, flipped")
    assert features.shape == (16, 1280) and not features.requires_grad
    with torch.no_grad():
        logits = predictor(torch.from_numpy(np.array(images)))
        mirrored = predictor(torch.from_numpy(np.array(images[:, :, ::-1])))
        head = predictor.net.head
        assert torch.allclose(head(features), logits, atol=1e-5)
        assert torch.allclose(head(flipped), mirrored, atol=1e-5)


def test_each_epoch_shows_each_photo_in_a_view_its_seed_decides():
    features = torch.arange(2 * 100 * 3, dtype=torch.float32).view(2, 100, 3)
    views = FeatureViews(features, np.zeros(100, dtype=np.int64))
    views.choose_views(seed=5, flip_p=0.5)
    first = views.view.clone()
    assert 30 < int(first.sum()) < 70
    batch, _ = views.__getitems__([0, 7, 7])
    assert torch.equal(batch, features[first[[0, 7, 7]], [0, 7, 7]])
    views.choose_views(seed=6, flip_p=0.5)
    assert not torch.equal(views.view, first)
    views.choose_views(seed=5, flip_p=0.5)
    assert torch.equal(views.view, first)
    views.choose_views(seed=5, flip_p=0.0)
    assert not views.view.any()


def test_a_probe_takes_the_augmentations_a_cache_holds_and_names_the_others():
    assert flip_probability([]) == 0.0
    assert flip_probability([{"name": "HorizontalFlip"}]) == 0.5
    assert flip_probability([{"name": "HorizontalFlip", "p": 0.3}]) == 0.3
    crop = {"name": "RandomResizedCrop", "size": [24, 24]}
    with pytest.raises(ValueError, match=r"HorizontalFlip .*only, not .*RandomResizedCrop"):
        flip_probability([crop])
    with pytest.raises(ValueError, match="CutMix"):
        flip_probability([{"name": "HorizontalFlip"}], cutmix_p=0.5)


def test_the_probe_trained_on_features_exports_a_whole_network_that_scores_alike(
    prepared, tmp_path
):
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": train_params()})
    candidate = from_mapping(CandidateConfig, candidate_params(**PROBE, lr=0.01, max_epochs=1))
    result = train(config, candidate, prepared, tmp_path / "work", tmp_path / "live")
    module = ImageClassifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")
    predictor = module.predictor.eval()
    # The whole network: ImageNet's backbone unchanged, a trained head.
    imagenet = load_backbone(0).state_dict()
    backbone = predictor.net.backbone.state_dict()
    assert all(torch.equal(backbone[k], imagenet[k]) for k in imagenet)
    model = export_onnx(predictor, image_size=32)  # refused unless it computes what torch does

    images, labels = load_split(prepared, "val", list(CLASSES))
    photos = torch.from_numpy(np.array(images))
    with torch.no_grad():
        eager = predictor(photos)
    exported = OnnxPredictor(model, 32)(photos)
    assert torch.equal(exported.argmax(1), eager.argmax(1))
    truth = torch.tensor(labels)
    # What training logged on the cached val features is the exported network's score.
    accuracy = (exported.argmax(1) == truth).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["final"]["val_acc"], abs=1e-6)
    loss = F.cross_entropy(exported, truth).item()
    assert loss == pytest.approx(result.metrics["best_val_loss"], abs=1e-4)
