"""Train real (tiny) models on generated faces through the Hydra entry point's code path."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from face_emotions.data.sample_faces import write_sample_dataset
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import load_checkpoint
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.settings import Settings
from face_emotions.training_config import compose_config
from training.train import run_training

pytestmark = [pytest.mark.slow]

# The seed's baseline at a narrow width and 64 px: trains in seconds on two CPU cores.
TINY_CNN = (
    "model=cnn",
    "model.image_size=64",
    "model.options.width=16",
    "model.options.depth=5",
)


def _train(sample_faces: Path, var_dir: Path, *overrides: str):
    cfg = compose_config(
        [
            f"data.path={sample_faces}",
            f"output_dir={var_dir}/runs/{uuid.uuid4().hex[:8]}",
            "training=fast",
            "training.accelerator=cpu",
            "training.progress_bar=false",
            *overrides,
        ]
    )
    return run_training(cfg)


@pytest.fixture(scope="module")
def training_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough faces (1,000) for a real learning curve in a few epochs."""
    root = tmp_path_factory.mktemp("training-faces")
    write_sample_dataset(root, per_class=200, seed=11, progress=False)
    (root / "Surprised").rename(root / "Suprise")
    return root


@pytest.fixture(scope="module")
def good_cnn(training_faces: Path, tmp_path_factory: pytest.TempPathFactory):
    """A cnn trained a few epochs: the model the learning and promotion tests share."""
    import os

    sample_faces = training_faces
    var_dir = tmp_path_factory.mktemp("train-var")
    os.environ["EMOTIONS_VAR_DIR"] = str(var_dir)
    try:
        result = _train(
            sample_faces,
            var_dir,
            *TINY_CNN,
            "training.max_epochs=15",
            "training.patience=15",
            "training.lr=0.005",
            "training.augment=false",
        )
    finally:
        del os.environ["EMOTIONS_VAR_DIR"]
    return var_dir, result


def test_cnn_learns_and_becomes_champion(good_cnn) -> None:
    var_dir, result = good_cnn
    assert result.report.accuracy >= 0.9, result.report.to_dict()
    assert result.version is not None and result.version.version == 1
    assert result.promotion is not None and result.promotion.promote
    registry = Registry(Settings(var_dir=var_dir))
    champion = registry.alias_version()
    assert champion is not None and champion.version == 1
    assert float(champion.tags["accuracy"]) == pytest.approx(result.report.accuracy, abs=1e-5)
    assert champion.tags["data_fingerprint"] and champion.tags["test_split_fingerprint"]
    # The checkpoint name follows the seed's convention and reloads into the same spec.
    assert result.checkpoint.name.startswith("emotion-epoch=")
    assert "-val_loss=" in result.checkpoint.name and result.checkpoint.suffix == ".ckpt"
    assert load_checkpoint(result.checkpoint).spec.architecture == "cnn"
    # Report, confusion matrix and the registered bundle (with ONNX) exist.
    report = json.loads((result.output_dir / "evaluation.json").read_text())
    assert set(report) >= {"accuracy", "weighted_f1", "macro_f1", "per_class", "passed"}
    assert (result.output_dir / "confusion_matrix.png").stat().st_size > 1000
    bundle = load_bundle(registry.download(champion))
    assert bundle.onnx_path is not None


def test_auto_does_not_promote_a_worse_model(good_cnn, training_faces: Path, monkeypatch) -> None:
    var_dir, _ = good_cnn
    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(var_dir))
    worse = _train(
        training_faces,
        var_dir,
        *TINY_CNN,
        "training.max_epochs=1",
        "training.lr=0.00001",
        "training.limit_train_batches=2",
        "promote=auto",
        "export_onnx=false",
    )
    assert worse.version is not None and worse.version.version == 2
    assert worse.promotion is not None and not worse.promotion.promote
    assert "does not beat" in worse.promotion.reason
    assert Registry(Settings(var_dir=var_dir)).alias_version().version == 1


def test_lite0_pretrained_trains_and_registers(
    sample_faces: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path))
    result = _train(
        sample_faces,
        tmp_path,
        "model=efficientnet_lite0",
        "model.image_size=64",
        "training.max_epochs=1",
        "training.limit_train_batches=3",
        "promote=never",
        "logging=tensorboard",
    )
    assert (
        result.version is not None and result.version.tags["architecture"] == "efficientnet_lite0"
    )
    assert result.promotion is not None and not result.promotion.promote
    assert Registry(Settings(var_dir=tmp_path)).alias_version() is None
    assert any((result.output_dir / "tensorboard").rglob("events.out.tfevents*"))
