"""MLflow model registry: publish bundles as versions, move the serving alias, fetch versions.

Versions are plain bundle directories (see :mod:`face_emotions.modeling.bundle`) logged as run
artefacts and registered by source URI; the alias ``champion`` (MLflow aliases, not the
deprecated stages) marks the version workers serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from face_emotions.settings import Settings
from face_emotions.settings import get_settings

log = logging.getLogger(__name__)
# MLflow draws a tqdm bar per download; workers and the CLI have their own progress reporting.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT_NAME = "face-emotions"
# Tags every version carries so that promotion and the API can compare versions without
# downloading them.
METRIC_TAGS = ("accuracy", "weighted_f1", "macro_f1")
TAG_DATA_FINGERPRINT = "data_fingerprint"
TAG_TEST_SPLIT = "test_split_fingerprint"
TAG_ARCHITECTURE = "architecture"
TAG_IMAGE_SIZE = "image_size"
#: SHA-256 over the bundle's files: what a version *is*, so a local cache can't confuse two
#: registries' "version 3".
TAG_CONTENT_HASH = "bundle_sha256"
#: Where ``training.train`` logs the test-split report (confusion matrix) in a version's run.
EVALUATION_ARTIFACT = "evaluation/evaluation.json"


class RegistryError(RuntimeError):
    """The registry can't be reached, or a version/alias asked for does not exist."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...]
    created_ms: int | None = None

    def metric(self, key: str) -> float | None:
        try:
            return float(self.tags[key])
        except (KeyError, ValueError):
            return None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class Registry:
    """Thin, typed wrapper over ``MlflowClient`` bound to one tracking URI and model name."""

    settings: Settings = field(default_factory=get_settings)

    def __post_init__(self) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = self.settings.tracking_uri
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        # No mlflow.set_tracking_uri(): it writes MLFLOW_TRACKING_URI into os.environ and would
        # leak this store into every other Settings/Registry of the process.
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.model_name = self.settings.model_name

    # -- experiments -------------------------------------------------------------------------

    def experiment_id(self, name: str = EXPERIMENT_NAME) -> str:
        """Create the experiment on first use with an absolute artefact root.

        Without one, a sqlite-backed store puts artefacts under ``./mlruns`` of whatever
        directory a process happens to run in, and workers started elsewhere can't find them.
        """
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:"):
            self.settings.artifact_root.mkdir(parents=True, exist_ok=True)
            location = self.settings.artifact_root.as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    # -- versions ----------------------------------------------------------------------------

    def publish(
        self,
        bundle_dir: str | Path,
        *,
        run_id: str,
        tags: dict[str, Any],
        description: str | None = None,
    ) -> VersionInfo:
        """Log ``bundle_dir`` into run ``run_id`` and register it as a new version."""
        from mlflow.exceptions import MlflowException

        # A unique path per publish: versions are immutable, even two from the same run.
        artifact_path = f"model-{uuid.uuid4().hex[:12]}"
        tags = {**tags, TAG_CONTENT_HASH: content_hash(Path(bundle_dir))}
        self.client.log_artifacts(run_id, str(bundle_dir), artifact_path=artifact_path)
        run = self.client.get_run(run_id)
        try:
            self.client.create_registered_model(
                self.model_name, description="Facial emotion classifier (5 classes)."
            )
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        version = self.client.create_model_version(
            self.model_name,
            source=f"{run.info.artifact_uri}/{artifact_path}",
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            description=description,
        )
        log.info("registered %s version %s", self.model_name, version.version)
        return self.get_version(int(version.version))

    def get_version(self, version: int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{self.model_name} has no version {version}") from exc
        return _info(mv)

    def list_versions(self) -> list[VersionInfo]:
        from mlflow.exceptions import MlflowException

        versions = self.client.search_model_versions(f"name = '{self.model_name}'")
        # search results carry no aliases; the registered model has the alias -> version map.
        try:
            alias_map = self.client.get_registered_model(self.model_name).aliases or {}
        except MlflowException:
            alias_map = {}
        aliases: dict[int, list[str]] = {}
        for alias, number in alias_map.items():
            aliases.setdefault(int(number), []).append(alias)
        infos = [_info(mv, tuple(sorted(aliases.get(int(mv.version), [])))) for mv in versions]
        return sorted(infos, key=lambda v: v.version, reverse=True)

    def alias_version(self, alias: str | None = None) -> VersionInfo | None:
        """The version behind ``alias`` (default: the serving alias), or None if unset."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(
                self.model_name, alias or self.settings.model_alias
            )
        except MlflowException:
            return None
        return _info(mv)

    def set_alias(self, version: int, alias: str | None = None) -> None:
        self.get_version(version)
        self.client.set_registered_model_alias(
            self.model_name, alias or self.settings.model_alias, str(version)
        )

    def evaluation(self, version: int) -> dict[str, Any] | None:
        """The test-split report training logged with ``version``'s run (confusion matrix,
        per-class metrics; see :class:`~face_emotions.modeling.evaluation.EvaluationReport`), or
        None when the run logged none (versions published outside ``training.train``).

        Raises :class:`RegistryError` for an unknown version and when the store can't be read.
        """
        from mlflow.exceptions import MlflowException

        info = self.get_version(version)
        if info.run_id is None:
            return None
        folder = EVALUATION_ARTIFACT.rsplit("/", 1)[0]
        try:
            logged = {entry.path for entry in self.client.list_artifacts(info.run_id, folder)}
            if EVALUATION_ARTIFACT not in logged:
                return None
            with tempfile.TemporaryDirectory(prefix="evaluation-") as staging:
                path = self.client.download_artifacts(info.run_id, EVALUATION_ARTIFACT, staging)
                return json.loads(Path(path).read_text())
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # the run was deleted
                return None
            raise RegistryError(f"cannot read the evaluation of version {version}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read the evaluation of version {version}: {exc}") from exc

    # -- loading -----------------------------------------------------------------------------

    def resolve(self, reference: str | int | None = None) -> VersionInfo:
        """A version number, an alias name, or a ``models:/name/<v|@alias>`` URI to a version."""
        if reference is None:
            reference = f"@{self.settings.model_alias}"
        text = str(reference)
        if text.startswith("models:/"):
            name, text = parse_model_uri(text)
            if name != self.model_name:
                raise RegistryError(
                    f"{reference!r} names model {name!r}, this registry serves {self.model_name!r}"
                )
        if text.startswith("@") or not text.isdigit():
            alias = text.lstrip("@")
            found = self.alias_version(alias)
            if found is None:
                raise RegistryError(
                    f"model {self.model_name!r} has no version with alias {alias!r}: train and "
                    "promote one first (python -m training.train, or face-emotions promote)"
                )
            return found
        return self.get_version(int(text))

    def cache_path(self, version: VersionInfo) -> Path:
        """Where ``version`` is cached: per registry (tracking URI) and per content.

        Two registries both have a "version 3" (a test store, a staging server); keyed by
        name and number alone, the cache would serve one's model for the other's version.
        """
        registry = hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:16]
        content = (
            version.tags.get(TAG_CONTENT_HASH)
            or hashlib.sha256(f"{version.source}|{version.run_id}".encode()).hexdigest()
        )
        root = self.settings.resolved_model_cache_dir
        return root / registry / self.model_name / f"{version.version}-{content[:16]}"

    def download(self, version: VersionInfo) -> Path:
        """Fetch a version into the local cache once; versions are immutable, so reuse is safe.

        A version published with a content hash is checked against it after the download.
        """
        import mlflow

        target = self.cache_path(version)
        if (target / "model.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version.version}-", dir=target.parent))
        try:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source,
                    dst_path=str(staging),
                    tracking_uri=self.tracking_uri,
                )
            )
            if not (downloaded / "model.json").is_file():
                raise RegistryError(
                    f"{self.model_name} v{version.version} at {version.source} is not a bundle"
                )
            expected = version.tags.get(TAG_CONTENT_HASH)
            if expected and content_hash(downloaded) != expected:
                raise RegistryError(
                    f"{self.model_name} v{version.version}: the downloaded files do not match "
                    "the content hash it was registered with (altered or incomplete artefacts)"
                )
            # Atomic publish: a concurrent worker either sees nothing or a complete directory.
            try:
                downloaded.rename(target)
            except OSError:
                if not (target / "model.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def content_hash(bundle_dir: Path) -> str:
    """SHA-256 over a bundle's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(bundle_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def download_bundle(uri: str, settings: Settings | None = None) -> Path:
    """``models:/face-emotion@champion`` or ``models:/face-emotion/3`` -> local bundle dir."""
    registry = Registry(settings or get_settings())
    if uri.startswith("runs:/"):
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, tracking_uri=registry.tracking_uri
            )
        )
    name, reference = parse_model_uri(uri)
    registry.model_name = name
    return registry.download(registry.resolve(reference))


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/name@alias`` -> (name, "@alias"); ``models:/name/3`` -> (name, "3")."""
    body = uri.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        reference = f"@{alias}"
    elif "/" in body:
        name, reference = body.split("/", 1)
    else:
        raise RegistryError(f"{uri!r} names no version: use models:/NAME@ALIAS or models:/NAME/N")
    if not name or reference in {"", "@"}:
        raise RegistryError(f"malformed model URI {uri!r}")
    return name, reference


def _info(mv: Any, aliases: tuple[str, ...] | None = None) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        source=mv.source,
        run_id=mv.run_id,
        tags=dict(mv.tags or {}),
        aliases=aliases if aliases is not None else tuple(getattr(mv, "aliases", ()) or ()),
        created_ms=getattr(mv, "creation_timestamp", None),
    )
