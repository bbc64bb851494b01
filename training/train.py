"""Train, evaluate, register and (maybe) promote a face-emotion model.

``python -m training.train [hydra overrides]``, e.g.::

    python -m training.train data.path=data/ training.accelerator=gpu
    python -m training.train model=cnn training=fast training.accelerator=cpu promote=never

The story of a run: seed -> split -> model -> loggers and callbacks -> fit -> export the best
checkpoint as a bundle -> evaluate the bundle on the test split -> register it in MLflow ->
apply the promotion policy.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from omegaconf import OmegaConf

from face_emotions.modeling.evaluation import EvaluationReport
from face_emotions.modeling.evaluation import plot_confusion_matrix
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.registry.promotion import PromotionDecision
from face_emotions.training_config import CONFIG_DIR
from training.progress import RunHooks
from training.run_environment import check_accelerator
from training.run_environment import face_cropping
from training.run_environment import one_handler_for_lightning
from training.run_environment import refresh_rate
from training.run_environment import resolve_precision

log = logging.getLogger("training.train")


@dataclass
class TrainingResult:
    run_id: str
    output_dir: Path
    checkpoint: Path
    report: EvaluationReport
    version: VersionInfo | None = None
    promotion: PromotionDecision | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: ``data.faces=detect``: images cropped, without a face, with several (CropReport.to_dict).
    faces: dict[str, int] | None = None
    #: The INT8 gate's report (GateReport.to_dict), None when no variant was attempted.
    int8: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "checkpoint": str(self.checkpoint),
            "version": self.version.version if self.version else None,
            "promoted": bool(self.promotion and self.promotion.promote),
            "promotion_reason": self.promotion.reason if self.promotion else None,
            "passed_targets": self.report.passed,
            **{f"test_{k}": round(v, 4) for k, v in self.metrics.items()},
            **({"faces": self.faces} if self.faces is not None else {}),
            **({"int8": self.int8} if self.int8 is not None else {}),
        }


def run_training(cfg: DictConfig, hooks: RunHooks | None = None) -> TrainingResult:
    """Split, train, evaluate, register and apply ``cfg.promote``.

    ``hooks`` follow it: progress reports per stage and during ``fit``, the MLflow run id as soon
    as it exists, and ``announce`` once a promotion moved the alias (a reload broadcast; see
    :func:`face_emotions.registry.promotion.promote`).
    """
    import lightning as L

    from face_emotions.faces.crop import CropSpec
    from face_emotions.modeling.bundle import ModelSpec
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.settings import Settings
    from face_emotions.training_config import check_values
    from training.datamodule import EmotionDataModule
    from training.module import EmotionClassifier

    hooks = hooks or RunHooks()
    one_handler_for_lightning()
    check_accelerator(str(cfg.training.accelerator))
    check_values(cfg)
    output_dir = Path(cfg.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    hooks.stage("preparing data")

    # Data: scan, hash, split before anything expensive, so a bad folder fails in seconds.
    crop = CropSpec(
        faces=str(cfg.data.faces),  # type: ignore[arg-type]  # checked by check_values
        margin=float(cfg.data.crop_margin),
        align=bool(cfg.data.crop_align),
    )
    spec = ModelSpec.for_architecture(
        cfg.model.name,
        cfg.model.image_size,
        dropout=cfg.model.dropout,
        options=_options(cfg.model.get("options")),
        crop=crop,
    )
    datamodule = EmotionDataModule(
        cfg.data.path,
        spec,
        batch_size=cfg.training.batch_size,
        num_workers=cfg.training.num_workers,
        augment=cfg.training.augment,
        fractions=tuple(cfg.data.fractions),
        seed=cfg.data.split_seed,
        dedup_distance=cfg.data.dedup_distance,
        hash_cache=cfg.data.hash_cache,
        faces=face_cropping(cfg, crop, hooks),
    )
    split = datamodule.prepare_split()
    class_weights = datamodule.class_weights() if cfg.training.class_weighting else None

    model = EmotionClassifier(
        spec.to_dict(),
        pretrained=cfg.model.pretrained,
        lr=cfg.training.lr,
        weight_decay=cfg.training.weight_decay,
        max_epochs=cfg.training.max_epochs,
        class_weights=class_weights,
        label_smoothing=cfg.training.label_smoothing,
    )

    settings = Settings()
    registry = Registry(settings)
    experiment_id = registry.experiment_id(cfg.logging.experiment)
    run = registry.client.create_run(
        experiment_id,
        run_name=cfg.run_name or f"{cfg.model.name}-{output_dir.name}",
        tags={"data_path": str(Path(cfg.data.path).resolve()), "output_dir": str(output_dir)},
    )
    run_id = run.info.run_id
    log.info("MLflow run %s (tracking %s)", run_id, registry.tracking_uri)
    if hooks.mlflow_run_started is not None:
        hooks.mlflow_run_started(run_id)
    # Lightning's MLFlowLogger calls mlflow.set_tracking_uri(), which also writes
    # MLFLOW_TRACKING_URI into os.environ; restore it so this run's store does not leak into
    # later runs or services of the same process.
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        result = _fit_and_publish(
            cfg, model, datamodule, split, registry, run_id, output_dir, hooks
        )
    except BaseException:
        registry.client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    registry.client.set_terminated(run_id, status="FINISHED")
    return result


def _fit_and_publish(
    cfg: DictConfig,
    model: Any,
    datamodule: Any,
    split: Any,
    registry: Any,
    run_id: str,
    output_dir: Path,
    hooks: RunHooks,
) -> TrainingResult:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import MLFlowLogger

    from face_emotions.modeling.bundle import load_bundle
    from face_emotions.modeling.bundle import load_checkpoint
    from face_emotions.modeling.bundle import save_bundle
    from face_emotions.registry.mlflow_registry import TAG_ARCHITECTURE
    from face_emotions.registry.mlflow_registry import TAG_DATA_FINGERPRINT
    from face_emotions.registry.mlflow_registry import TAG_IMAGE_SIZE
    from face_emotions.registry.mlflow_registry import TAG_TEST_SPLIT
    from face_emotions.registry.promotion import promote
    from training.evaluate import evaluate_bundle
    from training.int8_variant import add_variants
    from training.int8_variant import int8_options
    from training.int8_variant import int8_tags
    from training.mlflow_params import log_params
    from training.progress import ProgressCallback

    client = registry.client
    log_params(client, run_id, cfg, split)

    checkpoint_cb = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="emotion-epoch={epoch:02d}-val_loss={val_loss:.2f}",
        auto_insert_metric_name=False,
        monitor="val_loss",
        mode="min",
        save_top_k=1,
    )
    trainer_callbacks = [
        checkpoint_cb,
        EarlyStopping(monitor="val_loss", mode="min", patience=cfg.training.patience),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.training.progress_bar:
        trainer_callbacks.append(TQDMProgressBar(refresh_rate=max(1, refresh_rate())))
    if hooks.report is not None:
        trainer_callbacks.append(ProgressCallback(hooks.report))
    loggers: list[Any] = [
        MLFlowLogger(
            experiment_name=cfg.logging.experiment,
            tracking_uri=registry.tracking_uri,
            run_id=run_id,
        )
    ]
    if cfg.logging.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(output_dir), name="tensorboard"))

    trainer = L.Trainer(
        accelerator=cfg.training.accelerator,
        devices=cfg.training.devices,
        precision=resolve_precision(cfg.training.accelerator, cfg.training.precision),
        max_epochs=cfg.training.max_epochs,
        limit_train_batches=cfg.training.limit_train_batches,
        callbacks=trainer_callbacks,
        logger=loggers,
        enable_progress_bar=cfg.training.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(output_dir),
        deterministic=False,
    )
    trainer.fit(model, datamodule=datamodule)

    best = Path(checkpoint_cb.best_model_path or checkpoint_cb.last_model_path)
    if not best.is_file():
        raise RuntimeError("training produced no checkpoint (was the validation loop skipped?)")
    log.info("best checkpoint: %s", best)
    bundle = load_checkpoint(best)

    device = "cuda" if trainer.strategy.root_device.type == "cuda" else "cpu"
    hooks.stage("evaluating", epochs_trained=int(trainer.current_epoch))
    report = evaluate_bundle(bundle, split.test, batch_size=cfg.training.batch_size, device=device)
    report_path = report.write_json(output_dir / "evaluation.json")
    matrix_path = plot_confusion_matrix(
        report.confusion_matrix, output_dir / "confusion_matrix.png"
    )
    metrics = report.metrics()
    for key, value in metrics.items():
        client.log_metric(run_id, f"test_{key}", value)
    client.log_metric(run_id, "test_passed_targets", float(report.passed))
    client.log_artifact(run_id, str(report_path), "evaluation")
    client.log_artifact(run_id, str(matrix_path), "evaluation")
    log.info(
        "test split: accuracy %.4f, weighted F1 %.4f, macro F1 %.4f -> %s",
        report.accuracy,
        report.weighted_f1,
        report.macro_f1,
        "PASS" if report.passed else "FAIL (" + "; ".join(report.failures) + ")",
    )

    result = TrainingResult(
        run_id,
        output_dir,
        best,
        report,
        metrics=metrics,
        faces=split.faces.to_dict() if split.faces is not None else None,
    )
    if not cfg.register:
        return result

    test_fingerprint = split.fingerprint("test")
    assert bundle.model is not None  # a checkpoint always has its network
    bundle_dir = save_bundle(
        output_dir / "bundle",
        bundle.model,
        bundle.spec,
        metadata={
            "run_id": run_id,
            "checkpoint": best.name,
            "data_fingerprint": split.scan.fingerprint(),
            "test_split_fingerprint": test_fingerprint,
            "metrics": metrics,
        },
        export_onnx=cfg.export_onnx,
    )
    if cfg.export_onnx:
        hooks.stage("quantising", test_accuracy=round(report.accuracy, 4))
        gate = add_variants(bundle_dir, split.train, split.test, int8_options(cfg))
        if gate is not None:
            result.int8 = gate.to_dict()
            client.log_dict(run_id, result.int8, "evaluation/int8_gate.json")
            for key in ("accuracy_drop", "agreement"):
                client.log_metric(run_id, f"int8_{key}", float(result.int8[key]))
    hooks.stage("registering", test_accuracy=round(report.accuracy, 4))
    tags = {
        **{k: f"{metrics[k]:.6f}" for k in ("accuracy", "weighted_f1", "macro_f1")},
        "passed_targets": str(report.passed).lower(),
        TAG_DATA_FINGERPRINT: split.scan.fingerprint(),
        TAG_TEST_SPLIT: test_fingerprint,
        TAG_ARCHITECTURE: bundle.spec.architecture,
        TAG_IMAGE_SIZE: bundle.spec.image_size,
        "crop": f"faces={bundle.spec.crop.faces} margin={bundle.spec.crop.margin}"
        + (" align" if bundle.spec.crop.align else ""),
        "num_test_images": report.num_images,
        "num_train_images": len(split.train),
        **int8_tags(result.int8),
    }
    version = registry.publish(
        bundle_dir,
        run_id=run_id,
        tags=tags,
        description=f"{bundle.spec.architecture} @ {bundle.spec.image_size}px, test accuracy "
        f"{report.accuracy:.4f}",
    )
    result.version = version

    champion = registry.alias_version()
    champion_metrics = None
    if (
        str(cfg.promote) == "auto"
        and champion is not None
        and champion.version != version.version
        and champion.tags.get(TAG_TEST_SPLIT) != test_fingerprint
    ):
        log.info("evaluating champion v%s on this run's test split", champion.version)
        champion_report = evaluate_bundle(
            load_bundle(registry.download(champion)), split.test, device=device
        )
        champion_metrics = champion_report.metrics()
        client.log_metric(run_id, "champion_test_accuracy", champion_report.accuracy)
    result.promotion = promote(
        registry,
        version,
        str(cfg.promote),
        champion_metrics=champion_metrics,
        announce=hooks.announce,
    )
    client.set_tag(run_id, "registered_version", str(version.version))
    client.set_tag(run_id, "promoted", str(result.promotion.promote).lower())
    return result


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    return dict(OmegaConf.to_container(options, resolve=True))  # type: ignore[arg-type]


def _broadcast_reload() -> None:
    """Tell running workers about a promotion made from the command line (best effort)."""
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.settings import get_settings

    BrokerClient.from_settings(get_settings()).announce_promotion()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from face_emotions.data.labelled_folder import DatasetError
    from face_emotions.modeling.zoo import PretrainedWeightsUnavailable

    try:
        result = run_training(cfg, RunHooks(announce=_broadcast_reload))
    except (DatasetError, PretrainedWeightsUnavailable, ValueError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import json

    print(json.dumps(result.summary(), indent=2))
    print(outcome_line(result), file=sys.stderr)
    return result.report.accuracy


def outcome_line(result: TrainingResult) -> str:
    """What became of the run for a person: which version serves now, or what to do next."""
    if result.version is None:
        return "not registered (register=false)"
    version = result.version.version
    if result.promotion is None:
        return f"registered version {version}"
    if result.promotion.promote:
        return result.promotion.summary()
    return f"{result.promotion.summary()}. To serve it anyway: face-emotions promote {version}"


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
