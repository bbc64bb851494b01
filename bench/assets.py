"""What every figure runs on: generated faces, one set of weights, one registered champion.

Nothing is trained: throughput does not depend on what the weights learned, and ImageNet
EfficientNet-Lite0 weights ship with a package, so the model is the real serving architecture
at its real size, built offline in seconds. It is saved as a serving bundle (with its ONNX
export) and published as ``champion`` in a temp MLflow store, so the pipeline figures go
through the worker's real model loading.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import numpy as np

from face_emotions.data.images import decode_image
from face_emotions.data.images import iter_image_files
from face_emotions.data.images import load_batch_array

ARCHITECTURE = "efficientnet_lite0"
FACES = "faces"
WARMUP = "warmup"
WARMUP_ONE = "warmup-one"
TINY = "tiny"
PHOTOS = "photos"
PHOTO_SIZE = (640, 480)
#: Real photographs in scikit-image's wheel (a dev dependency): with and without a face.
PHOTO_SOURCES = (
    "astronaut.png",
    "camera.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
)


@dataclass
class Workspace:
    root: Path
    images: int
    image_size: int
    var_dir: Path = field(init=False)
    data_root: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.var_dir = self.root / "var"
        self.data_root = self.root / "data"
        self.logs = self.root / "logs"
        for path in (self.var_dir, self.data_root, self.logs):
            path.mkdir(parents=True, exist_ok=True)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.var_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.var_dir / 'emotions.db'}"

    @property
    def faces(self) -> Path:
        return self.data_root / FACES

    def face_paths(self) -> list[Path]:
        return iter_image_files(self.faces)

    def bundle_dir(self, size: int) -> Path:
        return self.root / f"bundle-{size}"


def make_faces(workspace: Workspace, tiny_jobs: int) -> list[Path]:
    """Exactly ``images`` faces (PNG/JPEG mix, 48-224 px, gray and colour) under faces/.

    Also: ``warmup/`` (one default micro-batch's worth, so a worker's first model load and its
    arenas are paid before timing), ``warmup-one/`` (for the batch_size=1 arena) and one
    single-image folder per tiny job.
    """
    from face_emotions.data.sample_faces import write_sample_dataset
    from face_emotions.labels import EMOTIONS

    per_class = -(-workspace.images // len(EMOTIONS))
    write_sample_dataset(workspace.faces, per_class, seed=0, progress=False)
    paths = workspace.face_paths()
    for surplus in paths[workspace.images :]:
        surplus.unlink()
    paths = paths[: workspace.images]
    for index, path in enumerate(paths[: min(len(paths), 64)]):
        _copy(path, workspace.data_root / WARMUP / f"{index}{path.suffix}")
    for index, path in enumerate(paths[:4]):
        _copy(path, workspace.data_root / WARMUP_ONE / f"{index}{path.suffix}")
    for index in range(tiny_jobs):
        path = paths[index % len(paths)]
        _copy(path, workspace.data_root / TINY / f"{index:04d}" / f"face{path.suffix}")
    return paths


def make_photos(workspace: Workspace, count: int) -> list[Path]:
    """``count`` 640x480 JPEG photos under photos/: scikit-image's real photos (two with one
    face, four without), each placed at a random scale and offset on a blurred copy of itself,
    mirrored or not, so no two files are the same and faces sit anywhere in the frame."""
    import skimage.data
    from PIL import ImageFilter
    from PIL import ImageOps

    rng = np.random.default_rng(3)
    folder = workspace.data_root / PHOTOS
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(skimage.data.__file__).parent
    sources = [decode_image(base / name) for name in PHOTO_SOURCES]
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        if rng.random() < 0.5:
            source = ImageOps.mirror(source)
        canvas = source.resize(PHOTO_SIZE).filter(ImageFilter.GaussianBlur(12))
        scale = rng.uniform(0.6, 0.95) * min(
            PHOTO_SIZE[0] / source.width, PHOTO_SIZE[1] / source.height
        )
        placed = source.resize((round(source.width * scale), round(source.height * scale)))
        offset = (
            int(rng.integers(0, PHOTO_SIZE[0] - placed.width + 1)),
            int(rng.integers(0, PHOTO_SIZE[1] - placed.height + 1)),
        )
        canvas.paste(placed, offset)
        path = folder / f"photo_{index:04d}.jpg"
        canvas.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def make_bundle(workspace: Workspace, size: int) -> Path:
    """Save the pretrained Lite0 with a 5-class head as a bundle (weights + ONNX) once."""
    directory = workspace.bundle_dir(size)
    if (directory / "model.json").is_file():
        return directory
    import torch

    from face_emotions.modeling.bundle import ModelSpec
    from face_emotions.modeling.bundle import save_bundle
    from face_emotions.modeling.zoo import create_model

    torch.manual_seed(0)  # the new 5-class head is random: make it the same every run
    model = create_model(ARCHITECTURE, pretrained=True).eval()
    spec = ModelSpec.for_architecture(ARCHITECTURE, size)
    return save_bundle(directory, model, spec, metadata={"purpose": "benchmark"})


def publish_champion(workspace: Workspace, bundle_dir: Path) -> int:
    """Register the bundle in the temp MLflow store and make it ``champion``."""
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.settings import Settings

    settings = Settings(
        var_dir=workspace.var_dir,
        mlflow_tracking_uri=workspace.tracking_uri,
        model_name="face-emotion",
        model_alias="champion",
    )
    registry = Registry(settings)
    run = registry.client.create_run(registry.experiment_id())
    version = registry.publish(
        bundle_dir,
        run_id=run.info.run_id,
        tags={"architecture": ARCHITECTURE, "image_size": workspace.image_size},
        description="benchmark weights (ImageNet Lite0, untrained head)",
    )
    registry.client.set_terminated(run.info.run_id)
    registry.set_alias(version.version)
    return version.version


def preprocessed(paths: list[Path], size: int, count: int) -> np.ndarray:
    """``count`` faces decoded and resized to ``size``: the input of forward-only loops."""
    chosen = [paths[i % len(paths)] for i in range(count)]
    return load_batch_array([decode_image(p) for p in chosen], size)
