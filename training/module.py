"""LightningModule: the zoo's network, cross-entropy, AdamW + cosine schedule, torchmetrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.classification import MulticlassF1Score

from face_emotions.labels import NUM_CLASSES
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.zoo import create_model


class EmotionClassifier(L.LightningModule):
    def __init__(
        self,
        spec: dict[str, Any],
        *,
        pretrained: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 30,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        # The spec travels in the checkpoint so bundle.load_checkpoint can rebuild the model.
        self.save_hyperparameters()
        self.spec = ModelSpec.from_dict(spec)
        self.model = create_model(
            self.spec.architecture,
            pretrained=pretrained,
            dropout=self.spec.dropout,
            **self.spec.options,
        )
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_f1 = MulticlassF1Score(NUM_CLASSES, average="weighted")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.log("val_loss", self.loss(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_weighted_f1", self.val_f1)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.hparams["max_epochs"])
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
