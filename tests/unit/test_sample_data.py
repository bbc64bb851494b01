"""Tests for the procedural face generator used by demos and tests.

The generator is only useful if it is reproducible (tests and demos must see the same data),
varied in everything but the expression (so models cannot take shortcuts), and still
learnable (so a demo training run shows a real learning curve).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from face_emotions.data.sample_faces import render_face
from face_emotions.data.sample_faces import write_sample_dataset
from face_emotions.labels import EMOTIONS


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _gray_array(emotion: str, seed: tuple[int, ...], side: int) -> np.ndarray:
    image = render_face(emotion, np.random.default_rng(list(seed)))
    image = image.convert("L").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("faces")
    counts = write_sample_dataset(root, per_class=20, seed=3, progress=False)
    return root, counts


def test_layout_counts_and_formats(dataset: tuple[Path, dict[str, int]]) -> None:
    root, counts = dataset
    assert counts == dict.fromkeys(EMOTIONS, 20)
    assert sorted(p.name for p in root.iterdir()) == sorted(EMOTIONS)
    suffixes = set()
    for emotion in EMOTIONS:
        files = sorted((root / emotion).iterdir())
        assert len(files) == 20
        assert sorted(int(f.stem) for f in files) == list(range(20))
        suffixes.update(f.suffix for f in files)
    assert suffixes == {".png", ".jpg"}


def test_sizes_and_modes_vary(dataset: tuple[Path, dict[str, int]]) -> None:
    root, _ = dataset
    sizes, modes = set(), set()
    for path in root.rglob("*.*"):
        with Image.open(path) as image:
            width, height = image.size
            assert width == height
            assert 48 <= width <= 224
            sizes.add(width)
            modes.add(image.mode)
    assert modes == {"L", "RGB"}
    assert len(sizes) > 20


def test_same_seed_same_bytes_and_rerun_overwrites(
    dataset: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    root, _ = dataset
    again = tmp_path / "again"
    # A different earlier run in the same place must be fully replaced, stale files included.
    write_sample_dataset(again, per_class=25, seed=99, progress=False, jpeg_fraction=1.0)
    write_sample_dataset(again, per_class=20, seed=3, progress=False)
    assert _files(again) == _files(root)


def test_different_seed_differs(dataset: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = dataset
    write_sample_dataset(tmp_path, per_class=20, seed=4, progress=False)
    first, second = _files(root), _files(tmp_path)
    shared = set(first) & set(second)
    assert sum(first[name] == second[name] for name in shared) == 0


def test_jpeg_fraction_extremes(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path / "png", per_class=3, progress=False, jpeg_fraction=0.0)
    write_sample_dataset(tmp_path / "jpg", per_class=3, progress=False, jpeg_fraction=1.0)
    assert {p.suffix for p in (tmp_path / "png").rglob("*.*")} == {".png"}
    assert {p.suffix for p in (tmp_path / "jpg").rglob("*.*")} == {".jpg"}


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_sample_dataset(tmp_path, per_class=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_render_face_respects_size_and_rejects_unknown_emotion() -> None:
    rng = np.random.default_rng(0)
    assert render_face("Happy", rng, size=64).size == (64, 64)
    with pytest.raises(ValueError, match="unknown emotion"):
        render_face("Disgust", rng)


def test_no_single_pixel_gives_the_class_away() -> None:
    # Nearest-class-mean on one pixel's value, fitted and scored on the same data (optimistic),
    # must stay far from a usable classifier: chance is 0.2.
    side, per_class = 32, 40
    features = np.stack(
        [
            _gray_array(emotion, (7, c, i), side).ravel()
            for c, emotion in enumerate(EMOTIONS)
            for i in range(per_class)
        ]
    )
    labels = np.repeat(np.arange(len(EMOTIONS)), per_class)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(len(EMOTIONS))])
    predictions = np.abs(features[:, None, :] - means[None, :, :]).argmin(axis=1)
    accuracy = (predictions == labels[:, None]).mean(axis=0)
    assert accuracy.max() <= 0.6


@pytest.mark.slow
def test_tiny_cnn_learns_the_expressions() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    side, train_per_class, test_per_class = 64, 60, 20

    def tensors(base: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = [
            _gray_array(emotion, (base, c, i), side)
            for c, emotion in enumerate(EMOTIONS)
            for i in range(per_class)
        ]
        x = torch.from_numpy(np.stack(images)[:, None]).sub(0.5).div(0.25)
        y = torch.arange(len(EMOTIONS)).repeat_interleave(per_class)
        return x, y

    x_train, y_train = tensors(11, train_per_class)
    x_test, y_test = tensors(12, test_per_class)

    # One thread: the net is tiny, and on a busy 2-core box extra threads only spin and wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, len(EMOTIONS)),
        )
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(12):
            model.train()
            order = torch.randperm(len(y_train))
            for start in range(0, len(order), 32):
                batch = order[start : start + 32]
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    # Chance is 0.2; the generator is tuned so that bigger nets on more data pass 0.9.
    assert accuracy > 0.7
