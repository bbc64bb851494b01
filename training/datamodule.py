"""LightningDataModule over a labelled folder with a leak-free split.

Near-duplicates are grouped by perceptual hash before the stratified 64/16/20 split, so that no
copy of a training image lands in the test set and the reported accuracy means something.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

from face_emotions.data.images import decode_image
from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.data.labelled_folder import ScanResult
from face_emotions.data.labelled_folder import scan_labelled_folder
from face_emotions.data.near_duplicates import near_duplicate_groups
from face_emotions.data.perceptual_hashing import perceptual_hashes
from face_emotions.data.splits import DEFAULT_FRACTIONS
from face_emotions.data.splits import DEFAULT_SEED
from face_emotions.data.splits import stratified_group_split
from face_emotions.data.splits import summarise_split
from face_emotions.labels import EMOTIONS
from face_emotions.labels import NUM_CLASSES
from face_emotions.modeling.bundle import ModelSpec
from training.face_crops import CropReport
from training.face_crops import FaceCropping
from training.transforms import Transform
from training.transforms import eval_transform
from training.transforms import train_transform

log = logging.getLogger(__name__)


class FaceDataset(Dataset):
    def __init__(self, items: Sequence[LabelledImage], transform: Transform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        return self.transform(decode_image(item.path)), item.label


@dataclass
class SplitData:
    train: list[LabelledImage]
    val: list[LabelledImage]
    test: list[LabelledImage]
    scan: ScanResult
    unreadable: list[Path]
    groups: int
    duplicate_images: int
    #: ``data.faces=detect``: what cropping found, and each crop's original file.
    faces: CropReport | None = None
    sources: dict[Path, Path] = field(default_factory=dict)

    def source(self, item: LabelledImage) -> Path:
        """The user's file behind ``item`` (a crop's original, else the item's own path)."""
        return self.sources.get(item.path, item.path)

    def fingerprint(self, split: str) -> str:
        """Identity of one split, so two models' test metrics are only compared when equal.

        Crops count as their original files plus the crop settings (in their cache folder's
        name), so the same photos cropped another way are another test set.
        """
        items = getattr(self, split)
        digest = hashlib.sha256()
        for item in sorted(items, key=lambda i: str(self.source(i))):
            crop = item.path.parent.name if item.path in self.sources else ""
            digest.update(
                f"{self.source(item)}\0{crop}\0{item.label}\0".encode("utf-8", "surrogateescape")
            )
        return digest.hexdigest()

    def class_counts(self, split: str) -> dict[str, int]:
        counts = np.bincount([i.label for i in getattr(self, split)], minlength=NUM_CLASSES)
        return {name: int(n) for name, n in zip(EMOTIONS, counts, strict=True)}


def split_folder(
    root: str | Path,
    *,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    dedup_distance: int = 4,
    hash_cache: Path | None = None,
    progress: bool = True,
    faces: FaceCropping | None = None,
) -> SplitData:
    """Scan, (crop faces,) hash and split; ``faces`` crops before the split, so near-duplicates
    are found among what the model sees, and the test split is made of crops too."""
    scan = scan_labelled_folder(root)
    candidates, sources, face_report = scan.items, {}, None
    if faces is not None:
        cropped = faces.crop(scan.items)
        candidates, sources, face_report = cropped.items, cropped.sources, cropped.report
        if not candidates:
            raise ValueError(
                f"no face was found in any of the {len(scan.items)} images of {root} "
                "(data.no_face=skip leaves nothing to train on): use data.no_face=keep or "
                "data.faces=none"
            )
    paths = [item.path for item in candidates]
    unreadable: list[int] = []
    hashes = perceptual_hashes(
        paths, cache_file=hash_cache, progress=progress, unreadable=unreadable
    )
    if unreadable:
        log.warning(
            "skipping %d unreadable images (first: %s)", len(unreadable), paths[unreadable[0]]
        )
    keep = np.ones(len(paths), dtype=bool)
    keep[unreadable] = False
    items = [item for item, k in zip(candidates, keep, strict=True) if k]
    labels = np.array([item.label for item in items], dtype=np.int64)
    groups = near_duplicate_groups(hashes[keep], max_distance=dedup_distance)
    assignment = stratified_group_split(labels, groups, fractions=fractions, seed=seed)
    summary = summarise_split(labels, groups, assignment)
    by_split = {
        name: [item for item, s in zip(items, assignment, strict=True) if s == name]
        for name in ("train", "val", "test")
    }
    for name, split_items in by_split.items():
        if not split_items:
            raise ValueError(
                f"the {name} split is empty: {len(items)} images are too few for a "
                f"{fractions} split; add images"
            )
    log.info(
        "split %d images in %d near-duplicate groups (%d images have a near-duplicate): %s",
        len(items),
        summary.groups,
        summary.duplicate_images,
        {k: len(v) for k, v in by_split.items()},
    )
    return SplitData(
        **by_split,
        scan=scan,
        unreadable=[sources.get(paths[i], paths[i]) for i in unreadable]
        + (face_report.unreadable if face_report else []),
        groups=summary.groups,
        duplicate_images=summary.duplicate_images,
        faces=face_report,
        sources=sources,
    )


def resolve_num_workers(requested: int | str) -> int:
    """``auto``: one loader process per core but the one training, at most four (decoding and
    augmenting ahead of the model; more only queue for the same cores)."""
    if str(requested) == "auto":
        return max(1, min(4, (os.cpu_count() or 1) - 1))
    workers = int(requested)
    if workers < 0:
        raise ValueError(f"training.num_workers must be >= 0 or auto, got {requested}")
    return workers


class EmotionDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | Path,
        spec: ModelSpec,
        *,
        batch_size: int = 32,
        num_workers: int | str = 0,
        augment: bool = True,
        fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
        seed: int = DEFAULT_SEED,
        dedup_distance: int = 4,
        hash_cache: str | Path | None = None,
        faces: FaceCropping | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.spec = spec
        self.batch_size = batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.augment = augment
        self.fractions = tuple(fractions)
        self.seed = seed
        self.dedup_distance = dedup_distance
        self.hash_cache = Path(hash_cache) if hash_cache else None
        self.faces = faces
        self.split: SplitData | None = None

    def prepare_split(self) -> SplitData:
        """Scan, hash and split once; called eagerly so train.py can log the split first."""
        if self.split is None:
            self.split = split_folder(
                self.path,
                fractions=self.fractions,  # type: ignore[arg-type]
                seed=self.seed,
                dedup_distance=self.dedup_distance,
                hash_cache=self.hash_cache,
                faces=self.faces,
            )
        return self.split

    def setup(self, stage: str | None = None) -> None:
        split = self.prepare_split()
        self.train_set = FaceDataset(split.train, train_transform(self.spec, augment=self.augment))
        self.val_set = FaceDataset(split.val, eval_transform(self.spec))
        self.test_set = FaceDataset(split.test, eval_transform(self.spec))

    def class_weights(self) -> list[float]:
        """Inverse-frequency weights (mean 1) against the 2.2:1 imbalance of the real data."""
        counts = np.array(list(self.prepare_split().class_counts("train").values()), dtype=float)
        weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
        return [float(w) for w in weights]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
