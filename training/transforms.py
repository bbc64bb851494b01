"""Image transforms for training and evaluation.

Evaluation reuses :func:`face_emotions.data.images.load_batch_array` and the predictor's
normalisation constants, so a model is validated on exactly the tensors it will be served.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from face_emotions.data.images import load_batch_array
from face_emotions.modeling.bundle import ModelSpec

Transform = Callable[[Image.Image], torch.Tensor]


def _normaliser(spec: ModelSpec) -> Callable[[np.ndarray], torch.Tensor]:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1) * 255.0

    def normalise(hwc: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).float() - mean) / std

    return normalise


def eval_transform(spec: ModelSpec) -> Transform:
    normalise = _normaliser(spec)

    def transform(image: Image.Image) -> torch.Tensor:
        return normalise(load_batch_array([image], spec.image_size)[0])

    return transform


def train_transform(spec: ModelSpec, *, augment: bool = True) -> Transform:
    """The seed's augmentations on top of the evaluation resize and normalisation."""
    if not augment:
        return eval_transform(spec)
    normalise = _normaliser(spec)
    augmentations = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.RandomPerspective(distortion_scale=0.1, p=0.3),
        ]
    )

    def transform(image: Image.Image) -> torch.Tensor:
        resized = load_batch_array([image], spec.image_size)[0]
        augmented = augmentations(Image.fromarray(resized))
        return normalise(np.array(augmented, dtype=np.uint8))

    return transform
