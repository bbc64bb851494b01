"""Test doubles of the broker client, shared by the API, submission, sweeper and fuzz tests.

They model :mod:`face_emotions.jobs.broker`'s protocols: :class:`ChunkOnlyBroker` is a
``ChunkSender`` only (a server that can't train), :class:`FakeBroker` also a
``TrainingSender``. Both record what they were asked to send; ``up = False`` makes every
send raise as a broker outage would.
"""

from __future__ import annotations

from typing import Any

from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.registry.mlflow_registry import VersionInfo


class ChunkOnlyBroker:
    def __init__(self) -> None:
        self.chunks: list[tuple[str, list[int]]] = []
        self.up = True

    def send_chunk(self, job_id: str, image_ids: list[int]) -> None:
        self._check()
        self.chunks.append((job_id, list(image_ids)))

    def __call__(self, job_id: str, image_ids: list[int]) -> None:
        """As the sweeper's ``enqueue`` callable."""
        self.send_chunk(job_id, image_ids)

    def ping(self) -> bool:
        return self.up

    def _check(self) -> None:
        if not self.up:
            raise ConnectionError("broker down")


class FakeBroker(ChunkOnlyBroker):
    def __init__(self) -> None:
        super().__init__()
        self.training: list[str] = []
        self.dispatches: list[str | None] = []  # each sending's dispatch stamp, as sent
        self.broadcasts = 0

    def send_training_run(self, run_id: str, dispatch: str | None = None) -> None:
        self._check()
        self.training.append(run_id)
        self.dispatches.append(dispatch)

    def broadcast_reload(self) -> None:
        self._check()
        self.broadcasts += 1


class MissingVersion(Exception):
    """What MLflow raises (as the cause of a ``RegistryError``) for a version it doesn't have."""

    error_code = "RESOURCE_DOES_NOT_EXIST"


class FakeRegistry:
    """The registry calls the API makes, over a fixed list of versions; ``up = False`` makes
    every read fail as an unreachable MLflow server would."""

    model_name = "face-emotion"

    def __init__(
        self,
        versions: list[int],
        champion: int | None,
        *,
        tags: dict[str, str] | None = None,
        evaluations: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.versions = versions
        self.aliases: dict[str, int] = {} if champion is None else {"champion": champion}
        self.tags = tags or {}
        self.evaluations = evaluations or {}
        self.client = None
        self.up = True

    def _version(self, number: int) -> VersionInfo:
        return VersionInfo(
            name=self.model_name,
            version=number,
            source=f"file:///artifacts/{number}",
            run_id=f"run{number}",
            tags=dict(self.tags),
            aliases=tuple(a for a, v in self.aliases.items() if v == number),
            created_ms=1_700_000_000_000,
        )

    def _check(self, version: int | None = None) -> None:
        if not self.up:
            raise RegistryError("registry down") from ConnectionError("refused")
        if version is not None and version not in self.versions:
            raise RegistryError(f"no version {version}") from MissingVersion()

    def list_versions(self) -> list[VersionInfo]:
        return [self._version(v) for v in sorted(self.versions, reverse=True)]

    def alias_version(self, alias: str | None = None) -> VersionInfo | None:
        self._check()
        number = self.aliases.get(alias or "champion")
        return None if number is None else self._version(number)

    def get_version(self, version: int) -> VersionInfo:
        self._check(version)
        return self._version(version)

    def resolve(self, reference: str | int | None = None) -> VersionInfo:
        """A version number or an alias name, as ``Registry.resolve``."""
        text = str(reference or "champion").lstrip("@")
        if text.isdigit():
            return self.get_version(int(text))
        found = self.alias_version(text)
        if found is None:
            raise RegistryError(f"no version with alias {text!r}")
        return found

    def download(self, version: VersionInfo) -> Any:
        """The fake's versions have no artefacts: as MLflow answers for a missing one."""
        self._check(version.version)
        raise RegistryError(f"version {version.version} has no artefacts") from MissingVersion()

    def set_alias(self, version: int, alias: str | None = None) -> None:
        self._check(version)
        self.aliases[alias or "champion"] = version

    def evaluation(self, version: int) -> dict[str, Any] | None:
        self._check(version)
        return self.evaluations.get(version)
