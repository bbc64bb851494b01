"""The one way a version becomes champion, for the API, the trainer and the CLI alike.

Promotion is a decision (:func:`decide_promotion`: pure, tested as a table) followed by two
side effects: moving the serving alias, then telling the workers. Keeping both behind
:func:`promote` means no caller can move the alias and forget the broadcast (workers would only
notice at their next poll), and every caller reports the same outcome: which version is
champion now and which it replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from face_emotions.registry.mlflow_registry import METRIC_TAGS
from face_emotions.registry.mlflow_registry import TAG_TEST_SPLIT
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.registry.mlflow_registry import VersionInfo

log = logging.getLogger(__name__)


class PromoteMode(StrEnum):
    AUTO = "auto"
    NEVER = "never"
    FORCE = "force"


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    previous: int | None = None
    candidate: int | None = None

    def summary(self) -> str:
        """One line for people: what is champion now, and why."""
        version = f"v{self.candidate}" if self.candidate is not None else "the candidate"
        if self.promote:
            replaced = f" (replaces v{self.previous})" if self.previous is not None else ""
            return f"{version} is now champion{replaced}: {self.reason}"
        kept = f"v{self.previous} stays champion" if self.previous is not None else "no champion"
        return f"{version} not promoted, {kept}: {self.reason}"


def decide_promotion(
    candidate: VersionInfo,
    champion: VersionInfo | None,
    mode: PromoteMode,
    champion_metrics: dict[str, float] | None = None,
) -> PromotionDecision:
    """Pure decision logic: accuracy decides, weighted F1 breaks ties; ties keep the champion."""
    previous = champion.version if champion else None

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, previous, candidate.version)

    if mode is PromoteMode.NEVER:
        return decision(False, "promote=never")
    if mode is PromoteMode.FORCE:
        return decision(True, "promote=force")
    if champion is None:
        return decision(True, "no champion yet")
    if champion.version == candidate.version:
        return decision(False, "candidate already is the champion")
    if champion_metrics is None:
        if champion.tags.get(TAG_TEST_SPLIT) != candidate.tags.get(TAG_TEST_SPLIT):
            return decision(
                False,
                "champion was evaluated on a different test split; evaluate it on the "
                "candidate's split to compare",
            )
        champion_metrics = {k: v for k in METRIC_TAGS if (v := champion.metric(k)) is not None}
    new = (candidate.metric("accuracy") or 0.0, candidate.metric("weighted_f1") or 0.0)
    old = (champion_metrics.get("accuracy", 0.0), champion_metrics.get("weighted_f1", 0.0))
    summary = (
        f"accuracy {new[0]:.4f} vs champion v{champion.version} {old[0]:.4f}, "
        f"weighted F1 {new[1]:.4f} vs {old[1]:.4f}"
    )
    if new > old:
        return decision(True, f"beats the champion: {summary}")
    return decision(False, f"does not beat the champion: {summary}")


def promote(
    registry: Registry,
    candidate: VersionInfo,
    mode: PromoteMode | str,
    *,
    champion_metrics: dict[str, float] | None = None,
    announce: Callable[[], None] | None = None,
) -> PromotionDecision:
    """Apply ``mode``; when the decision is to promote, move the alias and ``announce`` it.

    ``champion_metrics`` are the current champion's metrics measured on the candidate's test
    split; without them the champion's own tags are used, but only if they were measured on
    the same split (same ``test_split_fingerprint``), otherwise ``auto`` refuses to guess.
    ``announce`` tells running workers (a reload broadcast); it must not raise, since the alias
    has moved already and the workers' poll picks the version up anyway.
    """
    mode = PromoteMode(mode)
    champion = registry.alias_version()
    decision = decide_promotion(candidate, champion, mode, champion_metrics)
    if decision.promote:
        registry.set_alias(candidate.version)
        log.info("%s", decision.summary())
        if announce is not None:
            announce()
    else:
        log.info("%s", decision.summary())
    return decision
