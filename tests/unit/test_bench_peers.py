"""The benchmark's ``peers`` figure from injected numbers: its table and its verdict.

Needs neither Ray nor TorchServe (the ``bench`` extra): only how measured rates become the
figure, which the default install must be able to check.
"""

from __future__ import annotations

import argparse

import pytest

from bench.context import Context
from bench.context import Plan
from bench.figures import Figure
from bench.figures.peers import PathRate
from bench.figures.peers import compare
from bench.figures.peers import peer_list
from bench.figures.peers import peers_figure
from bench.figures.peers import peers_table
from bench.peers import PeerRun
from bench.peers import missing
from bench.peers.common import PeerResult
from bench.peers.common import parse_answer


def _rates(ray_http: float, ts_http: float, limit: float = 100.0) -> list[PathRate]:
    return [
        PathRate("ray", "handle", 94.0, limit),
        PathRate("ray", "HTTP", ray_http, limit),
        PathRate("torchserve", "HTTP", ts_http, limit),
    ]


def test_met_when_pipeline_beats_every_peer_on_ratio_and_rate() -> None:
    figure = peers_table(96.0, 0.96, _rates(84.0, 93.0), {})
    assert figure.met is True
    # The margin is the closest call: 96/93 on images/s, 0.96/0.93 on ratio.
    assert figure.ratio == pytest.approx(round(min(0.96 / 0.93, 96.0 / 93.0), 2))
    rows = {(row["peer"], row["path"]): row for row in figure.details["table"]}
    assert rows[("torchserve", "HTTP")]["ratio"] == "0.93"
    assert rows[("ray", "handle")]["img/s"] == "94.0"
    assert rows[("pipeline (REST job, Celery worker)", "HTTP")]["own limit img/s"] == "100.0"
    assert "target" in figure.line and ": yes" in figure.line


def test_not_met_when_a_peer_has_the_better_ratio() -> None:
    # The pipeline has more images/s (faster limit) but a worse ratio than TorchServe.
    figure = peers_table(110.0, 0.90, _rates(84.0, 93.0), {})
    assert figure.met is False
    assert ": no" in figure.line


def test_not_met_when_a_peer_has_more_images_per_second() -> None:
    # Better ratio, but TorchServe's own limit is faster and it serves more images/s.
    figure = peers_table(90.0, 0.95, _rates(84.0, 93.0, limit=120.0), {})
    assert figure.met is False


def test_the_handle_path_does_not_count() -> None:
    # Ray's handle at 0.99 beats the pipeline; only HTTP paths are compared.
    rates = [PathRate("ray", "handle", 99.0, 100.0), PathRate("ray", "HTTP", 80.0, 100.0)]
    assert peers_table(95.0, 0.95, rates, {}).met is True


def test_a_tie_is_not_above() -> None:
    figure = peers_table(93.0, 0.93, _rates(84.0, 93.0), {})
    assert figure.ratio == 1.0
    assert figure.met is False


def test_a_peer_not_measured_is_reported_with_why() -> None:
    rates = [PathRate("ray", "HTTP", 80.0, 100.0)]
    figure = peers_table(95.0, 0.95, rates, {"torchserve": "no Java runtime"})
    assert figure.met is True  # judged on the peers that were measured
    assert "not measured: torchserve: no Java runtime" in figure.measured
    assert figure.details["not_measured"] == {"torchserve": "no Java runtime"}
    assert any("not measured: no Java runtime" in row["ratio"] for row in figure.details["table"])


def test_no_peer_measured_is_unavailable_not_a_crash() -> None:
    figure = peers_table(95.0, 0.95, [], {"ray": "the bench extra is not installed"})
    assert figure.ratio is None and figure.met is None
    assert "the bench extra is not installed" in (figure.reason or "")


def test_without_the_pipeline_there_is_no_verdict_but_a_table() -> None:
    figure = peers_table(None, None, _rates(84.0, 93.0), {})
    assert figure.ratio is None
    assert len(figure.details["table"]) == 3


def _context(**args: object) -> Context:
    namespace = argparse.Namespace(only=["limit", "pipeline"], device="cpu", peers=[], **args)
    return Context(namespace, Plan.make(256, False, None), 2, 32, [32])


def test_compare_reads_the_pipeline_figure_and_the_drivers_samples() -> None:
    context = _context()
    context.figures["pipeline"] = Figure(
        "pipeline", 0.95, "", "", details={"pipeline": {"items_per_second": 95.0}}
    )
    ray = PeerResult(
        samples={"limit": [2.0, 2.0, 2.0], "handle": [2.2, 2.1, 2.3], "HTTP": [2.5, 2.5, 2.6]},
        images=200,
        settings={"backend": "onnx"},
        notes=["ray settings"],
        max_abs_diff=0.0,
    )
    runs = {
        "ray": PeerRun("ray", result=ray),
        "torchserve": PeerRun("torchserve", reason="timed out after 600 s"),
    }
    figure = compare(context, runs)
    # Ray over HTTP: 200 / 2.5 = 80 img/s, limit 100 img/s -> 0.80; pipeline 0.95, 95 img/s.
    assert figure.met is True
    assert figure.ratio == round(min(0.95 / 0.80, 95.0 / 80.0), 2)
    assert "ray settings" in figure.details["notes"]
    assert figure.details["peers"]["ray"]["backend"] == "onnx"
    assert "torchserve" in figure.details["not_measured"]


def test_not_asked_is_recorded_with_how_to_ask(capsys: pytest.CaptureFixture[str]) -> None:
    context = _context()
    peers_figure(context, None, None, [])  # type: ignore[arg-type]
    figure = context.figures["peers"]
    assert figure.ratio is None and "--peers" in (figure.reason or "")
    assert figure.line in capsys.readouterr().out


def test_peer_list_parses_and_rejects() -> None:
    assert peer_list("ray, torchserve") == ["ray", "torchserve"]
    assert peer_list("") == []
    with pytest.raises(argparse.ArgumentTypeError):
        peer_list("ray,triton")
    assert missing("triton") is not None


def test_parse_answer_takes_a_list_of_five_probabilities() -> None:
    assert parse_answer(b"[0.1, 0.2, 0.3, 0.2, 0.2]") == [0.1, 0.2, 0.3, 0.2, 0.2]
    with pytest.raises(RuntimeError):
        parse_answer(b'{"error": "boom"}')
