"""Backend autotuning: the fastest eligible backend wins; timings are injected, never measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import record_variants
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.serving import backend_tuning
from face_emotions.serving.backend_tuning import autotune
from face_emotions.serving.backend_tuning import candidate_backends

CPU = torch.device("cpu")
SIZE = 32


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec.for_architecture("cnn", SIZE, options={"width": 8})
    return save_bundle(tmp_path_factory.mktemp("tuning") / "b", create_model("cnn", width=8), spec)


def _with_probe(bundle_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "probed"
    shutil.copytree(bundle_dir, target)
    probe = np.random.default_rng(1).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
    record_variants(target, int8_file=None, int8_gate=None, probe_images=probe)
    return target


@dataclass
class Stub:
    """A predictor whose top-1 class on image i is ``classes[i % len(classes)]``."""

    backend: str
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), 5), dtype=np.float32)
        out[
            np.arange(len(batch)), [self.classes[i % len(self.classes)] for i in range(len(batch))]
        ] = 1
        return out


def _speeds(**seconds: float):
    def measure(predictor, batch) -> float:
        return seconds[predictor.backend.replace("-", "_")]

    return measure


def test_the_fastest_agreeing_backend_wins(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(_with_probe(bundle_dir, tmp_path))
    stubs = {name: Stub(name) for name in ("onnx", "onnx-int8", "torch")}
    tuning = autotune(
        bundle,
        CPU,
        stubs.__getitem__,
        batch_size=8,
        candidates=["onnx", "onnx-int8", "torch"],
        measure=_speeds(onnx=0.08, onnx_int8=0.04, torch=0.16),
    )
    assert tuning.chosen == "onnx-int8" and tuning.predictor is stubs["onnx-int8"]
    by_name = {t.backend: t for t in tuning.trials}
    assert by_name["onnx-int8"].images_per_second == pytest.approx(200.0)
    assert by_name["onnx"].images_per_second == pytest.approx(100.0)
    assert all(t.agreement == 1.0 and t.eligible for t in tuning.trials)
    assert tuning.table().splitlines()[1].split()[:2] == ["onnx-int8", "200.0"]


def test_a_backend_that_disagrees_is_never_chosen_however_fast(bundle_dir, tmp_path) -> None:
    bundle = load_bundle(_with_probe(bundle_dir, tmp_path))
    # bf16 changes the class of every 5th image: 80 % agreement on the 10 probe images.
    stubs = {"onnx": Stub("onnx"), "torch-bf16": Stub("torch-bf16", classes=(0, 1, 2, 3, 0))}
    tuning = autotune(
        bundle,
        CPU,
        stubs.__getitem__,
        batch_size=8,
        candidates=["onnx", "torch-bf16"],
        measure=_speeds(onnx=1.0, torch_bf16=0.001),
    )
    assert tuning.chosen == "onnx"
    bf16 = tuning.trials[1]
    assert bf16.agreement == pytest.approx(0.8) and not bf16.eligible
    assert bf16.reason == "agreement below 98 %"


def test_without_probe_images_bf16_cannot_compete_but_gated_int8_can(bundle_dir) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.probe_images() is None
    stubs = {name: Stub(name) for name in ("onnx", "onnx-int8", "torch-bf16")}
    tuning = autotune(
        bundle,
        CPU,
        stubs.__getitem__,
        batch_size=8,
        candidates=["onnx", "onnx-int8", "torch-bf16"],
        measure=_speeds(onnx=0.1, onnx_int8=0.05, torch_bf16=0.01),
    )
    assert tuning.chosen == "onnx-int8"
    assert tuning.trials[2].reason == "no probe images to check agreement"


def test_a_backend_that_fails_is_reported_not_raised(bundle_dir) -> None:
    bundle = load_bundle(bundle_dir)

    def build(name: str):
        if name == "torch":
            raise RuntimeError("no kernels here")
        return Stub(name)

    tuning = autotune(
        bundle, CPU, build, batch_size=4, candidates=["onnx", "torch"], measure=_speeds(onnx=1.0)
    )
    assert tuning.chosen == "onnx"
    assert tuning.trials[1].reason == "failed: no kernels here" and not tuning.trials[1].eligible


def test_real_predictors_are_measured(bundle_dir: Path) -> None:
    from face_emotions.serving.predictor import Predictor

    bundle = load_bundle(bundle_dir)
    tuning = autotune(
        bundle,
        CPU,
        lambda name: Predictor(bundle, backend=name),
        batch_size=4,
        batches=1,
        candidates=["onnx", "torch"],
    )
    assert tuning.chosen in {"onnx", "torch"}
    assert all(t.images_per_second and t.images_per_second > 0 for t in tuning.trials)


def test_candidates_follow_the_bundle_and_the_cpu(bundle_dir, tmp_path, monkeypatch) -> None:
    bundle = load_bundle(bundle_dir)
    monkeypatch.setattr(backend_tuning, "cpu_flags", lambda: frozenset({"avx2"}))
    assert candidate_backends(bundle, CPU) == ["onnx", "torch"]
    monkeypatch.setattr(backend_tuning, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    bundle.int8_onnx_path = bundle.onnx_path  # any file: the gate passed
    assert candidate_backends(bundle, CPU) == ["onnx", "torch", "onnx-int8", "torch-bf16"]
    bundle.onnx_path = bundle.int8_onnx_path = None
    assert candidate_backends(bundle, CPU) == ["torch", "torch-bf16"]


def test_a_burst_of_load_costs_every_backend_alike(bundle_dir: Path, tmp_path: Path) -> None:
    """Passes are timed in interleaved rounds: a slow moment (a neighbour starting) that lasts
    three passes must not land on one backend only and crown the other."""
    bundle = load_bundle(_with_probe(bundle_dir, tmp_path))
    stubs = {name: Stub(name) for name in ("onnx", "torch")}
    base = {"onnx": 0.08, "torch": 0.10}
    calls: list[str] = []

    def bursty(predictor, batch) -> float:
        calls.append(predictor.backend)
        slow = 5.0 if len(calls) <= 3 else 1.0  # the first three passes run under load
        return base[predictor.backend] * slow

    tuning = autotune(
        bundle, CPU, stubs.__getitem__, batch_size=8, candidates=["onnx", "torch"], measure=bursty
    )
    assert tuning.chosen == "onnx"
    assert calls == ["onnx", "torch", "torch", "onnx", "onnx", "torch"]
    by_name = {t.backend: t for t in tuning.trials}
    assert by_name["onnx"].images_per_second == pytest.approx(8 / 0.08)  # 0.4, 0.08, 0.08
    assert by_name["torch"].images_per_second == pytest.approx(8 / 0.5)  # 0.5, 0.5, 0.1


def test_a_backend_failing_while_timed_is_reported_not_chosen(
    bundle_dir: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(_with_probe(bundle_dir, tmp_path))
    stubs = {name: Stub(name) for name in ("onnx", "torch")}

    def measure(predictor, batch) -> float:
        if predictor.backend == "torch":
            raise RuntimeError("out of memory")
        return 0.1

    tuning = autotune(
        bundle, CPU, stubs.__getitem__, batch_size=8, candidates=["onnx", "torch"], measure=measure
    )
    by_name = {t.backend: t for t in tuning.trials}
    assert tuning.chosen == "onnx"
    assert not by_name["torch"].eligible and "out of memory" in by_name["torch"].reason
