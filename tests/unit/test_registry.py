"""Promotion rules, model URIs, and the registry against a real MLflow sqlite store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import load_model_source
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.registry.mlflow_registry import TAG_TEST_SPLIT
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.registry.mlflow_registry import parse_model_uri
from face_emotions.registry.promotion import PromoteMode
from face_emotions.registry.promotion import decide_promotion
from face_emotions.registry.promotion import promote
from face_emotions.settings import Settings
from face_emotions.settings import get_settings

MODEL = "face-emotion"


def _v(
    version: int,
    accuracy: float | None = None,
    weighted_f1: float | None = None,
    split: str | None = "split-a",
) -> VersionInfo:
    tags: dict[str, str] = {}
    if accuracy is not None:
        tags["accuracy"] = str(accuracy)
    if weighted_f1 is not None:
        tags["weighted_f1"] = str(weighted_f1)
    if split is not None:
        tags[TAG_TEST_SPLIT] = split
    return VersionInfo(MODEL, version, f"file:///v{version}", None, tags, ())


# --- decide_promotion: pure logic ------------------------------------------------------------

NEVER, FORCE, AUTO = PromoteMode.NEVER, PromoteMode.FORCE, PromoteMode.AUTO
CASES = [
    # id, candidate, champion, mode, champion_metrics, promote, reason fragment
    ("never-no-champion", _v(2, 0.9, 0.9), None, NEVER, None, False, "never"),
    ("never-better", _v(2, 0.99, 0.99), _v(1, 0.5, 0.5), NEVER, None, False, "never"),
    ("force-worse", _v(2, 0.1, 0.1), _v(1, 0.9, 0.9), FORCE, None, True, "force"),
    ("force-no-champion", _v(2), None, FORCE, None, True, "force"),
    ("auto-no-champion", _v(2, 0.1, 0.1), None, AUTO, None, True, "no champion"),
    ("auto-same-version", _v(1, 0.9, 0.9), _v(1, 0.9, 0.9), AUTO, None, False, "already"),
    ("auto-better-acc", _v(2, 0.91, 0.80), _v(1, 0.90, 0.90), AUTO, None, True, "beats"),
    ("auto-worse-acc", _v(2, 0.89, 0.99), _v(1, 0.90, 0.90), AUTO, None, False, "does not"),
    ("auto-tie-acc-better-f1", _v(2, 0.9, 0.91), _v(1, 0.9, 0.90), AUTO, None, True, "beats"),
    ("auto-tie-acc-worse-f1", _v(2, 0.9, 0.89), _v(1, 0.9, 0.90), AUTO, None, False, "does not"),
    ("auto-full-tie-keeps", _v(2, 0.9, 0.9), _v(1, 0.9, 0.9), AUTO, None, False, "does not"),
    ("auto-no-metrics", _v(2), _v(1, 0.5, 0.5), AUTO, None, False, "does not"),
    ("auto-champion-no-metrics", _v(2, 0.5, 0.5), _v(1), AUTO, None, True, "beats"),
    (
        "auto-other-split",
        _v(2, 0.99, 0.99),
        _v(1, 0.5, 0.5, split="split-b"),
        AUTO,
        None,
        False,
        "different test split",
    ),
    (
        "auto-other-split-measured-worse",
        _v(2, 0.90, 0.90),
        _v(1, 0.99, 0.99, split="split-b"),
        AUTO,
        {"accuracy": 0.85, "weighted_f1": 0.85},
        True,
        "beats",
    ),
    (
        "auto-other-split-measured-better",
        _v(2, 0.90, 0.90),
        _v(1, 0.10, 0.10, split="split-b"),
        AUTO,
        {"accuracy": 0.95, "weighted_f1": 0.95},
        False,
        "does not",
    ),
    (
        "auto-measured-tie",
        _v(2, 0.90, 0.90),
        _v(1, 0.10, 0.10),
        AUTO,
        {"accuracy": 0.90, "weighted_f1": 0.90},
        False,
        "does not",
    ),
]


@pytest.mark.parametrize(
    ("candidate", "champion", "mode", "champion_metrics", "promote", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide_promotion(
    candidate: VersionInfo,
    champion: VersionInfo | None,
    mode: PromoteMode,
    champion_metrics: dict[str, float] | None,
    promote: bool,
    reason: str,
) -> None:
    decision = decide_promotion(candidate, champion, mode, champion_metrics)
    assert decision.promote is promote
    assert reason in decision.reason
    assert decision.previous == (champion.version if champion else None)


def test_promotion_reason_names_the_numbers() -> None:
    decision = decide_promotion(_v(2, 0.8, 0.7), _v(1, 0.9, 0.85), AUTO)
    assert "0.8000" in decision.reason and "0.9000" in decision.reason and "v1" in decision.reason


def test_version_info_helpers() -> None:
    info = _v(3, accuracy=0.5)
    assert info.uri == "models:/face-emotion/3"
    assert info.metric("accuracy") == 0.5
    assert info.metric("weighted_f1") is None
    bad = VersionInfo(MODEL, 1, "s", None, {"accuracy": "n/a"}, ())
    assert bad.metric("accuracy") is None


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/face-emotion@champion", ("face-emotion", "@champion")),
        ("models:/face-emotion/3", ("face-emotion", "3")),
        ("models:/face-emotion/3/", ("face-emotion", "3")),
        ("models:/other@staging", ("other", "@staging")),
    ],
)
def test_parse_model_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/face-emotion", "names no version"),
        ("models:/", "names no version"),
        ("models:/@champion", "malformed"),
        ("models:/face-emotion@", "malformed"),
        ("models:/face-emotion//", "names no version"),
    ],
)
def test_parse_model_uri_errors(uri: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_model_uri(uri)


# --- a real MLflow store ---------------------------------------------------------------------


def _random_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn").eval()


def _outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


@dataclass
class Store:
    var_dir: Path
    settings: Settings
    registry: Registry
    v1: VersionInfo
    v2: VersionInfo
    expected: dict[int, torch.Tensor]  # version -> outputs of the model it holds


def _isolate_mlflow(mp: pytest.MonkeyPatch) -> None:
    """Start without a tracking URI and put MLflow's global state back afterwards.

    ``Registry`` calls ``mlflow.set_tracking_uri``, which also exports MLFLOW_TRACKING_URI.
    """
    import mlflow.tracking._tracking_service.utils as tracking_utils

    mp.setattr(tracking_utils, "_tracking_uri", None)
    for name in ("VAR_DIR", "MLFLOW_TRACKING_URI", "MODEL_NAME", "MODEL_ALIAS", "MODEL_CACHE_DIR"):
        mp.delenv(f"EMOTIONS_{name}", raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", "")  # remembers the original value for teardown
    mp.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        _isolate_mlflow(mp)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        settings = Settings(var_dir=root / "var")
        registry = Registry(settings)
        experiment = registry.experiment_id()
        spec = ModelSpec.for_architecture("cnn", image_size=32)
        expected: dict[int, torch.Tensor] = {}
        versions = []
        for number, (seed, accuracy) in enumerate([(1, 0.90), (2, 0.80)], start=1):
            # One run per version, as training does (see the same-run test below).
            run = registry.client.create_run(experiment)
            model = _random_cnn(seed)
            bundle = save_bundle(root / f"bundle{number}", model, spec, export_onnx=False)
            tags = {"accuracy": accuracy, "weighted_f1": accuracy, TAG_TEST_SPLIT: "split-a"}
            versions.append(registry.publish(bundle, run_id=run.info.run_id, tags=tags))
            expected[number] = _outputs(model)
        yield Store(root / "var", settings, registry, versions[0], versions[1], expected)


def _clear_champion(registry: Registry) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        registry.client.delete_registered_model_alias(MODEL, "champion")


def test_published_versions(store: Store) -> None:
    assert (store.v1.version, store.v2.version) == (1, 2)
    assert store.v1.tags["accuracy"] == "0.9"
    assert store.v2.tags[TAG_TEST_SPLIT] == "split-a"
    assert store.v1.source.startswith(store.settings.artifact_root.as_uri())
    assert store.registry.tracking_uri == f"sqlite:///{store.var_dir / 'mlflow' / 'mlflow.db'}"
    assert (store.var_dir / "mlflow" / "mlflow.db").is_file()


def test_promotion_sequence(store: Store) -> None:
    registry = store.registry
    _clear_champion(registry)
    assert registry.alias_version() is None

    first = promote(registry, store.v1, "auto")
    assert first.promote and first.previous is None
    assert registry.alias_version().version == 1

    worse = promote(registry, store.v2, "auto")  # accuracy 0.80 < 0.90 on the same split
    assert not worse.promote and worse.previous == 1
    assert registry.alias_version().version == 1

    forced = promote(registry, store.v2, PromoteMode.FORCE)
    assert forced.promote and forced.previous == 1
    assert registry.alias_version().version == 2

    listed = registry.list_versions()
    assert [v.version for v in listed] == [2, 1]
    assert listed[0].aliases == ("champion",)
    assert listed[1].aliases == ()


def test_promote_never_keeps_the_alias(store: Store) -> None:
    store.registry.set_alias(1)
    decision = promote(store.registry, store.v2, "never")
    assert not decision.promote
    assert store.registry.alias_version().version == 1


def test_set_alias_of_a_missing_version(store: Store) -> None:
    with pytest.raises(RegistryError, match="has no version 99"):
        store.registry.set_alias(99)


def test_resolve(store: Store) -> None:
    registry = store.registry
    registry.set_alias(2)
    assert registry.resolve("@champion").version == 2
    assert registry.resolve("champion").version == 2
    assert registry.resolve().version == 2  # the serving alias by default
    assert registry.resolve(1).version == 1
    assert registry.resolve("1").version == 1
    assert registry.resolve("models:/face-emotion@champion").version == 2
    assert registry.resolve("models:/face-emotion/1").version == 1
    assert registry.resolve(1).source == store.v1.source


def test_resolve_unknown_alias(store: Store) -> None:
    with pytest.raises(RegistryError, match="no version with alias 'staging'") as info:
        store.registry.resolve("@staging")
    assert "promote" in str(info.value)  # tells the user how to get one


def test_resolve_unknown_version(store: Store) -> None:
    with pytest.raises(RegistryError, match="has no version 42"):
        store.registry.resolve(42)


def test_resolve_uri_of_another_model_does_not_return_ours(store: Store) -> None:
    store.registry.set_alias(2)
    with pytest.raises(RegistryError):
        store.registry.resolve("models:/some-other-model@champion")


def test_download_and_cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    version = store.registry.resolve(1)
    target = store.registry.download(version)
    assert target.is_relative_to(store.settings.resolved_model_cache_dir)
    assert target.parent.name == MODEL and target.name.startswith("1-")
    assert (target / "model.json").is_file()
    assert torch.equal(_outputs(load_bundle(target).model), store.expected[1])
    # No staging directories are left next to the cached version.
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("the cached version should have been reused")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert store.registry.download(store.registry.resolve(1)) == target


def test_load_model_source_from_registry_uri(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.registry.set_alias(2)
    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(store.var_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # must come from EMOTIONS_VAR_DIR
    get_settings.cache_clear()
    try:
        assert get_settings().var_dir == store.var_dir.resolve()
        bundle = load_model_source("models:/face-emotion@champion")
        assert torch.equal(_outputs(bundle.model), store.expected[2])
        by_number = load_model_source("models:/face-emotion/1")
        assert torch.equal(_outputs(by_number.model), store.expected[1])
    finally:
        get_settings.cache_clear()


def test_second_settings_is_not_hijacked_by_the_first_registry(
    store: Store, tmp_path: Path
) -> None:
    assert store.registry is not None  # a Registry exists in this process
    other = Settings(var_dir=tmp_path / "other")
    assert other.tracking_uri == f"sqlite:///{(tmp_path / 'other').resolve()}/mlflow/mlflow.db"


def test_two_versions_from_one_run_keep_their_own_weights(store: Store, tmp_path: Path) -> None:
    registry = Registry(Settings(var_dir=store.var_dir, model_name="face-emotion-same-run"))
    assert registry.tracking_uri == store.registry.tracking_uri
    run = registry.client.create_run(registry.experiment_id())
    spec = ModelSpec.for_architecture("cnn", image_size=32)
    published = []
    for seed in (3, 4):
        model = _random_cnn(seed)
        bundle = save_bundle(tmp_path / f"b{seed}", model, spec, export_onnx=False)
        published.append((registry.publish(bundle, run_id=run.info.run_id, tags={}), model))
    (first, first_model), (second, _) = published
    assert first.version != second.version
    downloaded = registry.download(first)
    assert torch.equal(_outputs(load_bundle(downloaded).model), _outputs(first_model))


def test_evaluation_is_read_from_the_versions_run(store: Store, tmp_path: Path) -> None:
    """The report ``training.train`` logs (``evaluation/evaluation.json``) behind the API's
    ``/models/<v>/evaluation``; versions whose run logged none have no evaluation."""
    import numpy as np

    from face_emotions.modeling.evaluation import evaluate_predictions

    report = evaluate_predictions(np.array([0, 1, 2, 3, 4, 4]), np.array([0, 1, 2, 3, 4, 0]))
    path = report.write_json(tmp_path / "evaluation.json")
    store.registry.client.log_artifact(store.v1.run_id, str(path), "evaluation")

    evaluation = store.registry.evaluation(store.v1.version)
    assert evaluation is not None
    assert evaluation["confusion_matrix"] == report.confusion_matrix
    assert evaluation["classes"] == ["Angry", "Fear", "Happy", "Sad", "Surprised"]
    assert evaluation["accuracy"] == pytest.approx(5 / 6)
    assert store.registry.evaluation(store.v2.version) is None
    with pytest.raises(RegistryError):
        store.registry.evaluation(99)


def test_promote_announces_only_a_moved_alias(store: Store) -> None:
    """The one promote path tells the workers exactly when the alias moved."""
    store.registry.set_alias(1)
    announced: list[int] = []

    def announce() -> None:
        announced.append(store.registry.alias_version().version)

    kept = promote(store.registry, store.v2, "auto", announce=announce)
    assert not kept.promote and announced == []
    assert kept.summary().startswith("v2 not promoted, v1 stays champion: does not beat")
    moved = promote(store.registry, store.v2, "force", announce=announce)
    assert moved.promote and announced == [2], "announced before the alias moved"
    assert moved.summary() == "v2 is now champion (replaces v1): promote=force"


def test_the_cache_tells_registries_and_contents_apart(store: Store, tmp_path: Path) -> None:
    """Version 1 of another registry (or with other files) is never served from our cache."""
    from face_emotions.registry.mlflow_registry import TAG_CONTENT_HASH

    ours = store.registry.resolve(1)
    assert len(ours.tags[TAG_CONTENT_HASH]) == 64, "published versions carry a content hash"
    other = Registry(
        Settings(
            var_dir=tmp_path,
            mlflow_tracking_uri=f"sqlite:///{tmp_path / 'other.db'}",
            model_cache_dir=store.settings.resolved_model_cache_dir,
        )
    )
    assert other.cache_path(ours) != store.registry.cache_path(ours)
    changed = VersionInfo(**{**ours.__dict__, "tags": {**ours.tags, TAG_CONTENT_HASH: "0" * 64}})
    assert store.registry.cache_path(changed) != store.registry.cache_path(ours)


def test_a_download_that_does_not_match_its_hash_is_refused(store: Store) -> None:
    from face_emotions.registry.mlflow_registry import TAG_CONTENT_HASH

    ours = store.registry.resolve(2)
    altered = VersionInfo(**{**ours.__dict__, "tags": {**ours.tags, TAG_CONTENT_HASH: "f" * 64}})
    with pytest.raises(RegistryError, match="content hash"):
        store.registry.download(altered)
