"""Register a model trained elsewhere as a normal version: check, evaluate, publish, promote.

The CLI (``face-emotions models import``) and the API (``POST /api/v1/models``) both call
:func:`import_model`, so an import is refused, tagged, evaluated and promoted the same way from
both. Every check runs before anything touches the registry: a refused import leaves no run
and no version behind.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from face_emotions.data.labelled_folder import DatasetError
from face_emotions.data.labelled_folder import scan_labelled_folder
from face_emotions.modeling.bundle import IMPORTED_KIND
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import save_imported_bundle
from face_emotions.modeling.evaluation import EvaluationReport
from face_emotions.modeling.import_spec import ImportRefused
from face_emotions.modeling.import_spec import ImportSpec
from face_emotions.modeling.import_spec import LabelMapping
from face_emotions.modeling.onnx_import import check_model
from face_emotions.registry.mlflow_registry import EVALUATION_ARTIFACT
from face_emotions.registry.mlflow_registry import TAG_ARCHITECTURE
from face_emotions.registry.mlflow_registry import TAG_IMAGE_SIZE
from face_emotions.registry.mlflow_registry import TAG_TEST_SPLIT
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.registry.promotion import PromoteMode
from face_emotions.registry.promotion import PromotionDecision
from face_emotions.registry.promotion import promote
from face_emotions.serving.folder_evaluation import evaluate_on_items

log = logging.getLogger(__name__)

TAG_SOURCE = "source"
SOURCE_IMPORTED = "imported"
TAG_IMPORT_SPEC = "import_spec"
TAG_LABEL_MAPPING = "label_mapping"
TAG_ONNX_SHA256 = "onnx_sha256"
TAG_IMPORT_SOURCE = "import_source"
#: Where the spec is logged in the version's run, beside the evaluation.
SPEC_ARTIFACT_DIR = "import"


@dataclass(frozen=True)
class ImportOutcome:
    version: VersionInfo
    mapping: LabelMapping
    report: EvaluationReport | None
    decision: PromotionDecision


def import_model(
    registry: Registry,
    onnx_file: Path,
    spec: ImportSpec,
    *,
    eval_folder: Path | None = None,
    promote_mode: PromoteMode | str = PromoteMode.AUTO,
    announce: Callable[[], None] | None = None,
    device: str = "cpu",
    max_import_mb: int | None = None,
) -> ImportOutcome:
    """Check ``onnx_file`` against ``spec``, then register it (raises :class:`ImportRefused`).

    With ``eval_folder`` the version is evaluated on it, and ``auto`` promotes it only if it
    beats the champion measured on the same folder; without one only ``force`` promotes.
    ``max_import_mb``: the caller's limit (default: the registry's settings).
    """
    mode = PromoteMode(promote_mode)
    max_bytes = (max_import_mb or registry.settings.max_import_mb) * 2**20
    checked = check_model(onnx_file, spec, max_bytes=max_bytes)
    items = None
    if eval_folder is not None:
        try:
            scan = scan_labelled_folder(eval_folder)
        except DatasetError as exc:
            raise ImportRefused(f"evaluation folder: {exc}") from exc
        items = scan.items
    with tempfile.TemporaryDirectory(prefix="onnx-import-") as staging:
        bundle_dir = save_imported_bundle(
            Path(staging) / "bundle",
            onnx_file,
            spec,
            metadata={"source": spec.source, "onnx_sha256": checked.sha256},
        )
        report = None
        if items is not None:
            report = evaluate_on_items(load_bundle(bundle_dir), items, device=device)
        tags: dict[str, object] = {
            TAG_SOURCE: SOURCE_IMPORTED,
            TAG_ARCHITECTURE: IMPORTED_KIND,
            TAG_IMAGE_SIZE: spec.input_size,
            TAG_IMPORT_SPEC: json.dumps(spec.model_dump(mode="json"), sort_keys=True),
            TAG_LABEL_MAPPING: json.dumps(checked.mapping.to_dict()),
            TAG_ONNX_SHA256: checked.sha256,
            TAG_IMPORT_SOURCE: spec.source[:500],
            "crop": f"faces={spec.face_crop.faces} margin={spec.face_crop.margin}"
            + (" align" if spec.face_crop.align else ""),
        }
        if report is not None:
            tags.update({k: f"{report.metrics()[k]:.6f}" for k in ("accuracy", "weighted_f1")})
            tags["macro_f1"] = f"{report.macro_f1:.6f}"
            tags["passed_targets"] = str(report.passed).lower()
            tags[TAG_TEST_SPLIT] = scan.fingerprint()
            tags["num_test_images"] = report.num_images
        run_id = registry.client.create_run(
            registry.experiment_id(), run_name=f"import-{checked.sha256[:12]}"
        ).info.run_id
        try:
            spec_file = Path(staging) / "spec.yaml"
            spec_file.write_text(spec.to_yaml())
            registry.client.log_artifact(run_id, str(spec_file), SPEC_ARTIFACT_DIR)
            if report is not None:
                path = report.write_json(Path(staging) / "evaluation" / "evaluation.json")
                registry.client.log_artifact(
                    run_id, str(path), EVALUATION_ARTIFACT.rsplit("/", 1)[0]
                )
            version = registry.publish(
                bundle_dir,
                run_id=run_id,
                tags=tags,
                description=f"imported ONNX ({spec.input_size} px {spec.colour}, "
                f"{len(spec.labels)} labels): {spec.source[:200]}",
            )
        except BaseException:
            registry.client.set_terminated(run_id, status="FAILED")
            raise
        registry.client.set_terminated(run_id, status="FINISHED")
    log.info("imported %s as version %s", onnx_file.name, version.version)
    decision = _promote(registry, version, mode, items, device, announce)
    return ImportOutcome(version, checked.mapping, report, decision)


def _promote(
    registry: Registry,
    version: VersionInfo,
    mode: PromoteMode,
    items: list | None,
    device: str,
    announce: Callable[[], None] | None,
) -> PromotionDecision:
    """``auto`` needs an evaluation, and measures the champion on the same folder."""
    if mode is PromoteMode.AUTO and items is None:
        champion = registry.alias_version()
        return PromotionDecision(
            False,
            "imported without an evaluation folder: only promote=force can promote it",
            champion.version if champion else None,
            version.version,
        )
    champion_metrics = None
    if mode is PromoteMode.AUTO and items is not None:
        champion = registry.alias_version()
        if champion is not None and champion.version != version.version:
            log.info("evaluating champion v%s on the evaluation folder", champion.version)
            champion_bundle = load_bundle(registry.download(champion))
            champion_metrics = evaluate_on_items(champion_bundle, items, device=device).metrics()
    return promote(registry, version, mode, champion_metrics=champion_metrics, announce=announce)
