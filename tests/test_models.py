"""Candidate networks: every one builds, takes uint8 photos of any size, and scripts."""

import warnings

import pytest
import torch

from tests.helpers.tiny_prepared import CLASSES, trainer_args, write_prepared
from vitrine.model.embeddings import load_backbone
from vitrine.model.networks import (
    MODELS,
    ImageClassifier,
    build_predictor,
    cutmix,
    fold_batch_norm,
)
from vitrine.model.training import CandidateConfig, EarlyStoppingConfig, TrainConfig, train

# A small input size per model keeps the tests fast; a new entry in MODELS must be added here.
SMALL = {
    "cnn64": ({}, 32),
    "lenet5": ({}, 32),
    "effnet_lite0": ({"mode": "probe"}, 32),
    "effnet_lite1": ({"mode": "probe"}, 32),
}


def test_every_model_is_covered():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_takes_uint8_photos_of_any_size_and_scripts(name):
    options, size = SMALL[name]
    torch.manual_seed(0)
    predictor = build_predictor(name, len(CLASSES), size, options).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        scripted = torch.jit.script(predictor)
    for shape in [(2, 45, 30, 3), (1, size, size, 3), (3, 128, 128, 3)]:
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        with torch.no_grad():
            logits = predictor(images)
            assert logits.shape == (shape[0], len(CLASSES))
            assert torch.allclose(scripted(images), logits, atol=1e-5)


def test_unknown_model_and_mode_are_named():
    with pytest.raises(KeyError, match="unknown model 'resnet50'"):
        build_predictor("resnet50", 2)
    with pytest.raises(ValueError, match="mode must be 'probe' or 'finetune'"):
        build_predictor("effnet_lite0", 2, 32, {"mode": "frozen"})
    with pytest.raises(TypeError, match="width"):
        build_predictor("cnn64", 2, options={"width": 64})


def test_probe_freezes_the_backbone_even_in_train_mode():
    net = build_predictor("effnet_lite0", 2, 32, {"mode": "probe"}).train().net
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    assert not any(m.training for m in net.backbone.modules())
    finetune = build_predictor("effnet_lite0", 2, 32, {"mode": "finetune"}).train().net
    assert all(p.requires_grad for p in finetune.parameters())
    assert all(m.training for m in finetune.backbone.modules())


def test_dropout_and_stochastic_depth_act_in_training_only():
    photos = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    plain = build_predictor("effnet_lite0", 2, 32, {"mode": "finetune"})
    torch.manual_seed(0)
    options = {"mode": "finetune", "drop_rate": 0.5, "drop_path_rate": 0.2}
    regularised = build_predictor("effnet_lite0", 2, 32, options)
    with torch.no_grad():
        # Same weights, so in eval mode the options change nothing the service computes...
        assert torch.equal(plain.eval()(photos), regularised.eval()(photos))
        regularised.train()
        # ...while in training each pass drops different features and blocks.
        assert not torch.allclose(regularised(photos), regularised(photos))
        plain.train()
        assert torch.equal(plain(photos), plain(photos))


def test_folded_batch_norms_compute_what_the_network_does_on_a_copy():
    predictor = build_predictor("effnet_lite0", 2, 64, {"mode": "finetune"}).train()
    folded = fold_batch_norm(predictor)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    # The network itself keeps its norms, its mode and its gradients: training goes on.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.modules()) == 49
    assert predictor.training and all(p.requires_grad for p in predictor.parameters())
    photos = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(folded(photos), predictor.eval()(photos), atol=1e-4)
    plain = build_predictor("cnn64", 2)  # no batch norm: nothing to fold, no copy
    assert fold_batch_norm(plain) is plain


def test_validation_runs_a_folded_copy_that_no_checkpoint_or_optimizer_sees():
    module = ImageClassifier("effnet_lite0", list(CLASSES), 0.01, input_size=32)
    keys, parameters = set(module.state_dict()), len(list(module.parameters()))
    module.on_validation_epoch_start()
    assert set(module.state_dict()) == keys and len(list(module.parameters())) == parameters
    photos = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        eager = module.eval()(photos)
        assert torch.allclose(module.folded["val"](photos), eager, atol=1e-4)
    module.on_validation_epoch_end()
    assert not module.folded  # training changes the weights: the next epoch folds afresh


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    sizes = {"train": 16, "val": 8, "test": 8}  # one training step of 16 photos
    return write_prepared(tmp_path_factory.mktemp("prepared"), split_sizes=sizes)


def fit_effnet(prepared, workdir, mode: str, **options) -> dict[str, torch.Tensor]:
    """One epoch of effnet_lite0 at 32 px; the trained backbone's tensors."""
    config = TrainConfig(
        CLASSES, 0, 0, "none", EarlyStoppingConfig("val_loss", "min", 3, 0.0), trainer_args()
    )
    candidate = CandidateConfig(
        "effnet_lite0", {"mode": mode, **options}, 32, 16, 0.01, 0.0, 0.0, False, 1, ()
    )
    result = train(config, candidate, prepared, workdir / "ckpt", workdir / "live")
    state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    prefix = "predictor.net.backbone."
    return {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


def test_probe_trains_the_head_only_and_finetune_every_layer(prepared, tmp_path):
    imagenet = load_backbone(0).state_dict()
    probed = fit_effnet(prepared, tmp_path / "probe", "probe")
    assert probed.keys() == imagenet.keys()
    # Weights and batch-norm statistics alike: a frozen backbone stays in eval mode.
    assert all(torch.equal(probed[k], imagenet[k]) for k in imagenet)
    tuned = fit_effnet(prepared, tmp_path / "finetune", "finetune")
    changed = {k for k in imagenet if not torch.equal(tuned[k], imagenet[k])}
    assert "conv_stem.weight" in changed and "bn1.running_mean" in changed
    assert "conv_head.weight" in changed


def test_frozen_blocks_keep_the_stem_and_first_stages_as_imagenet_left_them(prepared, tmp_path):
    imagenet = load_backbone(0).state_dict()
    tuned = fit_effnet(prepared, tmp_path / "frozen", "finetune", frozen_blocks=2)
    changed = {k for k in imagenet if not torch.equal(tuned[k], imagenet[k])}
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    # Weights and batch-norm statistics alike, through Lightning's train/eval switches.
    assert not {k for k in changed if k.startswith(frozen)}
    assert "blocks.2.0.conv_pw.weight" in changed and "blocks.2.0.bn1.running_mean" in changed
    assert "conv_head.weight" in changed


def test_a_network_with_frozen_blocks_scripts_as_package_needs():
    predictor = build_predictor("effnet_lite0", 2, 32, {"mode": "finetune", "frozen_blocks": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        scripted = torch.jit.script(predictor.eval())
    images = torch.randint(0, 256, (2, 45, 30, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(scripted(images), predictor(images), atol=1e-5)


def test_frozen_blocks_are_for_finetuning_within_the_backbone():
    with pytest.raises(ValueError, match="probe freezes every block"):
        build_predictor("effnet_lite0", 2, 32, {"mode": "probe", "frozen_blocks": 2})
    with pytest.raises(ValueError, match=r"frozen_blocks must be 0\.\.7"):
        build_predictor("effnet_lite0", 2, 32, {"mode": "finetune", "frozen_blocks": 8})


def test_cutmix_pastes_one_box_from_each_images_partner():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16)  # image i is all i
    torch.manual_seed(0)
    mixed, partner, kept = cutmix(images, alpha=1.0)
    assert sorted(partner.tolist()) == [0, 1, 2, 3]
    own = mixed == images
    from_partner = mixed == images[partner]
    moved = partner != torch.arange(4)
    # Every pixel is the image's own or its partner's; the partner's form one box, whose
    # area is the fraction `kept` leaves, the same for every image that got a new partner.
    assert bool((own | from_partner).all())
    assert 0 < kept < 1
    for i in torch.nonzero(moved).ravel().tolist():
        assert own[i].float().mean().item() == pytest.approx(kept)
        rows, cols = torch.nonzero(~own[i, 0], as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box.item() == len(rows)  # a rectangle
    torch.manual_seed(0)
    again, same_partner, same_kept = cutmix(images, alpha=1.0)
    assert torch.equal(again, mixed) and torch.equal(same_partner, partner)
    assert same_kept == kept


def cutmix_loss(cutmix_p: float) -> tuple[float, bool]:
    """One training step of cnn64 on eight different photos: its loss, and whether it drew
    from torch's generator."""
    torch.manual_seed(0)
    module = ImageClassifier("cnn64", list(CLASSES), 0.01, input_size=32, cutmix_p=cutmix_p)
    photos = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    batch = (photos, torch.tensor([0, 1] * 4))
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step(batch, 0).item()
    return loss, not torch.equal(state, torch.get_rng_state())


def test_cutmix_p_decides_whether_a_batch_is_mixed():
    plain, drew = cutmix_loss(0.0)
    assert not drew  # without CutMix, dropout and the rest see the same random stream
    mixed, drew = cutmix_loss(1.0)
    assert drew and mixed != pytest.approx(plain)
