"""The training configuration (Hydra): the config tree, composing it, and what a run may change.

The tree (``configs/``: one group per swappable part, ``model``, ``training``, ``data``,
``logging``) is shared by ``python -m training.train``, the trainer service and the API: the API
composes a requested run's configuration exactly as the trainer will, so a run the trainer
would refuse is refused at submission (400) instead of failing minutes later in the trainer.

What a request may not do: set what the service owns (paths on the trainer's disk, ``promote``,
``hydra.*``), choose a config group by anything but the name of one of its files (a choice such
as ``logging=../../x`` would load a YAML from anywhere), or use interpolations (``${oc.env:..}``
would read the trainer's environment into MLflow params). Errors never show the trainer's
config search path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_NAME = "config"
MAX_OVERRIDES = 50
MAX_OVERRIDE_CHARS = 500
OVERRIDE_PATTERN = re.compile(r"^[A-Za-z0-9_.+~/-]+=.*$")
#: Keys the service sets itself, and the request field to use instead (None: no field).
#: ``data.path``, ``output_dir`` and ``data.hash_cache`` are paths on the trainer's disk, which a
#: request must not choose; ``hydra`` would reconfigure the framework itself. These keys and
#: everything under them are refused.
RESERVED_OVERRIDES: dict[str, str | None] = {
    "data.path": "data",
    "data.hash_cache": None,
    "data.crop_cache": None,
    "promote": "promote",
    "output_dir": None,
    "hydra": None,
    # Hydra reads a defaults list from the config files only; as a key it would only mislead.
    "defaults": None,
}
#: Config groups chosen by a request field: selecting them in ``overrides`` is refused, their
#: sub-keys are allowed (``model.image_size=64`` is fine, ``model=resnet18`` goes through the
#: validated field).
RESERVED_GROUPS: dict[str, str] = {"data": "data", "model": "model"}
#: Keys whose value is one of a few words, and keys with a range: the configs are not typed
#: schemas, so ``data.faces=yes`` would compose and fail (or do nothing) only in the trainer.
VALUE_CHOICES: dict[str, tuple[str, ...]] = {
    "data.faces": ("detect", "none"),
    "data.no_face": ("keep", "skip"),
}
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "data.crop_margin": (1.0, 3.0),
    "int8.calibration_images": (1, 10_000),
    "int8.max_accuracy_drop": (0.0, 1.0),
    "int8.max_recall_drop": (0.0, 1.0),
    "int8.min_agreement": (0.0, 1.0),
    "probe_images": (0, 1024),
}
_ABSOLUTE_PATH = re.compile(r"(?:file://)?(?<![\w.])/[^\s'\"]+")


class OverrideError(ValueError):
    """A requested override the trainer would refuse, in words fit to show the requester."""


def compose_config(overrides: Sequence[str] | None = None) -> DictConfig:
    """The config ``python -m training.train <overrides>`` would see."""
    from hydra import compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides or []))


def group_choices() -> dict[str, tuple[str, ...]]:
    """Each config group and the names it offers (its YAML files)."""
    return {
        group.name: tuple(sorted(path.stem for path in group.glob("*.yaml")))
        for group in sorted(CONFIG_DIR.iterdir())
        if group.is_dir()
    }


def hydra_quote(value: str) -> str:
    """A single-quoted Hydra override value that reads back exactly as ``value``.

    Backslashes are doubled only where Hydra would read them as escapes (before a quote, an
    interpolation or the closing quote); ``${`` is escaped so OmegaConf does not resolve it.
    """
    escaped = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, value)
    escaped = escaped.replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def service_overrides(*, data_dir: Path, output_dir: Path, promote: str) -> list[str]:
    """What the trainer service sets itself after a run's own overrides.

    Paths are quoted for Hydra's override grammar, so a data root with spaces, quotes, commas
    or ``${`` is taken literally.
    """
    return [
        f"data.path={hydra_quote(str(data_dir))}",
        f"promote={promote}",
        f"output_dir={hydra_quote(str(output_dir))}",
        # One line per redraw in a service log is noise; progress is in the run's record.
        "training.progress_bar=false",
    ]


def override_key(override: str) -> str:
    """``++training.lr=1`` -> ``training.lr``: the dotted key an override sets or deletes."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.replace("/", ".")


def check_override(override: str, *, from_fields: bool = False) -> None:
    """One requested override on its own: ``key=value``, a key the request may set, a config
    group chosen by one of its names, no interpolation. Raises :class:`OverrideError`.

    The override is read with Hydra's own parser, so what is checked is what Hydra will do:
    an escaped ``$\\{oc.env:X\\}`` is refused like ``${oc.env:X}`` (Hydra unescapes it into an
    interpolation), and so are a package (``logging@_global_=...``), a deletion (``~key=``),
    a nested group path (``hydra/launcher=``, ``+logging/x=../..``) and a sweep.

    ``from_fields``: the override was made from a request's own field (``model=...``), which
    may choose a group the free-form overrides may not.
    """
    if len(override) > MAX_OVERRIDE_CHARS:
        raise OverrideError(f"an override is longer than {MAX_OVERRIDE_CHARS} characters")
    if not OVERRIDE_PATTERN.fullmatch(override):
        raise OverrideError(
            f"{override!r} is not a Hydra override like 'training.lr=0.001' (key=value)"
        )
    key = override_key(override)
    for reserved, field in RESERVED_OVERRIDES.items():
        if key == reserved or key.startswith(reserved + "."):
            hint = f"; use the '{field}' field" if field else ""
            raise OverrideError(f"{override!r}: {reserved} is set by the service{hint}")
    if key in RESERVED_GROUPS and not from_fields:
        raise OverrideError(
            f"{override!r}: choose the {key} with the '{RESERVED_GROUPS[key]}' field"
        )
    if "${" in override:
        raise OverrideError(f"{override!r}: interpolations (${{...}}) are not allowed")
    parsed = _parse(override)
    if "/" in parsed.key_or_group or parsed.package is not None:
        raise OverrideError(
            f"{override!r}: a config group is chosen as group=name (no '/' or '@' in the key)"
        )
    if parsed.is_delete():
        raise OverrideError(f"{override!r}: removing a key or group (~) is not allowed")
    if parsed.is_sweep_override():
        raise OverrideError(f"{override!r}: sweeps (choice, range, glob, ...) are not allowed")
    if any("${" in text for text in _strings(parsed.value())):
        raise OverrideError(f"{override!r}: interpolations (${{...}}) are not allowed")
    choices = group_choices()
    if key in choices and (
        parsed.is_add() or parsed.is_force_add() or parsed.value() not in choices[key]
    ):
        raise OverrideError(
            f"{override!r}: {key} must be one of {', '.join(choices[key])}, chosen as "
            f"{key}=NAME (a name, not a path; no '+')"
        )


def _parse(override: str) -> Override:
    """Hydra's reading of ``override``; its grammar errors without the input echoed twice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override)
    except Exception as exc:  # OverrideParseException, or the lexer's own
        raise OverrideError(f"{override!r} is not a valid Hydra override") from exc


def _strings(value: Any) -> Iterator[str]:
    """Every string of a parsed override value (lists and dicts included, keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def check_run_config(
    overrides: Sequence[str], *, data_dir: Path, output_dir: Path, promote: str
) -> DictConfig:
    """Compose a run's configuration as the trainer will; :class:`OverrideError` if it can't be.

    Every override of the run (its fields' and its free-form ones) is checked first
    (:func:`check_override`), then the whole configuration is composed, which refuses unknown
    keys (``data.image_size``), values of the wrong type and duplicate keys, with Hydra's own
    reason minus any path of this machine.
    """
    for override in overrides:
        check_override(override, from_fields=True)
    own = service_overrides(data_dir=data_dir, output_dir=output_dir, promote=promote)
    groups = [o for o in overrides if override_key(o) in group_choices()]
    try:
        cfg = compose_config([*overrides, *own])
        defaults = compose_config([*groups, *own])
    except Exception as exc:  # Hydra's and OmegaConf's errors share no useful base class
        raise OverrideError(_describe(exc)) from exc
    for override in overrides:
        _check_type(override, cfg, defaults)
    check_values(cfg)
    return cfg


def check_values(cfg: DictConfig) -> None:
    """The keys of :data:`VALUE_CHOICES` and :data:`VALUE_RANGES` hold allowed values; raises
    :class:`OverrideError` (a ``ValueError``: ``python -m training.train`` exits 2 on it)."""
    from omegaconf import OmegaConf

    for key, allowed in VALUE_CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in allowed:
            raise OverrideError(f"{key}={value}: must be one of {', '.join(allowed)}")
    for key, (low, high) in VALUE_RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
        ):
            raise OverrideError(f"{key}={value}: must be a number from {low} to {high}")


def _check_type(override: str, cfg: DictConfig, defaults: DictConfig) -> None:
    """A value of the type the config's default has: the configs are not typed schemas, so
    ``training.lr=fast`` composes, and would fail only in the optimiser, minutes later."""
    from omegaconf import OmegaConf

    key = override_key(override)
    if key in group_choices():
        return
    default = OmegaConf.select(defaults, key, default=None)
    value = OmegaConf.select(cfg, key, default=None)
    if default is None or value is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, int | float):
        ok = isinstance(value, int | float) and (
            isinstance(default, float) or isinstance(value, int)
        )
    else:
        ok = True
    if not ok:
        raise OverrideError(
            f"{override!r}: {key} takes a {type(default).__name__}, like its default {default!r}"
        )


def _describe(exc: BaseException) -> str:
    """Hydra's first line of explanation, with no file path of this machine in it."""
    text = str(exc).split("Config search path", 1)[0].strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return _ABSOLUTE_PATH.sub("<path>", first)
