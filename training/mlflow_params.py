"""A run's parameters in MLflow: the whole composed config plus what the split (and, with
``data.faces=detect``, face cropping) found."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from omegaconf import OmegaConf


def log_params(client: Any, run_id: str, cfg: DictConfig, split: Any) -> None:
    from mlflow.entities import Param

    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    flat.update(
        {
            "split.train": len(split.train),
            "split.val": len(split.val),
            "split.test": len(split.test),
            "split.groups": split.groups,
            "split.duplicate_images": split.duplicate_images,
            "split.unreadable": len(split.unreadable),
            "data.fingerprint": split.scan.fingerprint(),
            "data.unknown_folders": ",".join(sorted(split.scan.unknown_folders)) or "-",
        }
    )
    if split.faces is not None:  # data.faces=detect: how many images had no face, or several
        flat.update({f"faces.{key}": value for key, value in split.faces.to_dict().items()})
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}
