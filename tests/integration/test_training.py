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
def good_cnn(training_faces: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """A cnn trained a few epochs: the model the learning, promotion, INT8 and backend tests
    share, as (a registry of this process's own, the training result).

    Trained once per test run. ``make test``'s processes (pytest-xdist) split this module's
    tests between them, and each used to train the model again (half a minute alone, two
    minutes beside the other process): now the first process to get here trains it into a
    directory they all share, under a file lock, and the others wait for it and read its
    result. Each process then works on a copy of the registry, because one test registers a
    version of its own; the copies' artifacts stay where the training wrote them (the registry
    stores absolute locations), which the tests only read.
    """
    import os
    import pickle
    import shutil

    from filelock import FileLock

    if worker_id == "master":  # one process: nothing to share
        shared = tmp_path_factory.mktemp("good-cnn")
    else:  # this run's base directory, one level above each process's own
        shared = tmp_path_factory.getbasetemp().parent / "good-cnn"
    trained = shared / "result.pickle"
    with FileLock(f"{shared}.lock"):
        if not trained.is_file():
            var_dir = shared / "var"
            var_dir.mkdir(parents=True, exist_ok=True)
            os.environ["EMOTIONS_VAR_DIR"] = str(var_dir)
            try:
                result = _train(
                    training_faces,
                    var_dir,
                    *TINY_CNN,
                    "training.max_epochs=15",
                    "training.patience=15",
                    "training.lr=0.005",
                    "training.augment=false",
                )
            finally:
                del os.environ["EMOTIONS_VAR_DIR"]
            trained.write_bytes(pickle.dumps(result))
    own = tmp_path_factory.mktemp("train-var")
    shutil.copytree(shared / "var" / "mlflow", own / "mlflow", ignore=_artifacts)
    return own, pickle.loads(trained.read_bytes())


def _artifacts(directory: str, names: list[str]) -> list[str]:
    """The registry's database is copied; the artifacts it points at are not."""
    return ["artifacts"] if Path(directory).name == "mlflow" else []


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


# -- the INT8 variant and backend autotuning (on good_cnn's registered version) ---------------


def _champion_bundle(var_dir: Path):
    registry = Registry(Settings(var_dir=var_dir))
    champion = registry.alias_version()
    return registry, champion, load_bundle(registry.download(champion))


def test_int8_variant_passes_its_gate_and_is_registered(good_cnn) -> None:
    var_dir, result = good_cnn
    assert result.int8 is not None and result.int8["passed"], result.int8
    assert result.int8["calibration_images"] == 64
    assert result.int8["test_images"] == result.report.num_images
    _, champion, bundle = _champion_bundle(var_dir)
    assert champion.tags["int8_gate"] == "passed"
    assert float(champion.tags["int8_agreement"]) >= 0.98
    assert bundle.int8_onnx_path is not None and bundle.int8_onnx_path.is_file()
    assert bundle.int8_gate is not None and bundle.int8_gate["passed"]
    probe = bundle.probe_images()
    assert probe.shape == (64, 64, 64, 3) and probe.dtype.name == "uint8"


def test_int8_gate_refuses_a_blank_calibration_and_publishes_nothing(
    good_cnn, training_faces: Path, tmp_path: Path
) -> None:
    import shutil

    import numpy as np

    from face_emotions.modeling.int8 import INT8_ONNX_FILE
    from face_emotions.serving.model_holder import ModelHolder
    from training.datamodule import split_folder
    from training.int8_variant import Int8Options
    from training.int8_variant import add_variants
    from training.int8_variant import int8_tags

    _, result = good_cnn
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(result.output_dir / "bundle", bundle_dir)
    (bundle_dir / INT8_ONNX_FILE).unlink()
    split = split_folder(training_faces)
    blank = np.zeros((64, 64, 64, 3), dtype=np.uint8)
    report = add_variants(
        bundle_dir, split.train, split.test, Int8Options(), calibration_override=blank
    )
    assert report is not None and not report.passed
    assert any("agreement" in failure for failure in report.failures), report.failures
    assert report.accuracy_drop > 0.005
    assert not (bundle_dir / INT8_ONNX_FILE).exists()
    bundle = load_bundle(bundle_dir)
    assert bundle.int8_onnx_path is None
    assert bundle.int8_gate is not None and bundle.int8_gate["failures"] == report.failures

    # A registry of its own: the module's tests number good_cnn's registry versions.
    settings = Settings(var_dir=tmp_path / "var", backend="onnx-int8")
    registry = Registry(settings)
    run = registry.client.create_run(registry.experiment_id())
    version = registry.publish(
        bundle_dir, run_id=run.info.run_id, tags=int8_tags(report.to_dict())
    ).version
    info = registry.get_version(version)
    assert info.tags["int8_gate"] == "failed" and "agreement" in info.tags["int8_failures"]
    assert load_bundle(registry.download(info)).int8_onnx_path is None
    # Forcing INT8 on a version without a published variant serves fp32, not a broken model.
    assert ModelHolder(settings).pinned(version).backend == "onnx"


def test_auto_serves_the_int8_variant_when_it_measures_fastest(good_cnn) -> None:
    import numpy as np

    from face_emotions.serving.model_holder import ModelHolder
    from face_emotions.serving.predictor import Predictor

    var_dir, _ = good_cnn
    _, champion, bundle = _champion_bundle(var_dir)

    def int8_fastest(predictor, batch) -> float:
        return 0.001 if predictor.backend == "onnx-int8" else 0.01

    holder = ModelHolder(Settings(var_dir=var_dir, backend="auto"), measure=int8_fastest)
    serving = holder.current()
    assert serving.version == champion.version and serving.backend == "onnx-int8"
    assert serving.tuning is not None
    measured = {trial.backend: trial for trial in serving.tuning.trials}
    assert {"onnx", "onnx-int8", "torch"} <= set(measured)
    assert measured["onnx-int8"].eligible and measured["onnx-int8"].agreement >= 0.98
    assert holder.describe()["backend"] == "onnx-int8"
    probe = bundle.probe_images()
    by_hand = Predictor(bundle, backend="onnx-int8").predict_array(probe)
    np.testing.assert_allclose(serving.predictor.predict_array(probe), by_hand, atol=1e-6)

    def torch_fastest(predictor, batch) -> float:
        return 0.001 if predictor.backend == "torch" else 0.01

    holder = ModelHolder(Settings(var_dir=var_dir, backend="auto"), measure=torch_fastest)
    assert holder.current().backend == "torch"


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "torch", "torch-bf16"])
def test_an_explicit_backend_is_honoured(good_cnn, backend: str) -> None:
    from face_emotions.serving.model_holder import ModelHolder

    var_dir, _ = good_cnn

    def never(predictor, batch) -> float:
        raise AssertionError("an explicit backend is not measured")

    serving = ModelHolder(Settings(var_dir=var_dir, backend=backend), measure=never).current()
    assert serving.backend == backend and serving.tuning is None
