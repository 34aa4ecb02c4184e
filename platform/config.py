"""Typed, frozen run configuration: YAML presets + ``KEY=VALUE`` overrides.

The dataclass defaults are the official DINOv2 ``ssl_default_config.yaml`` values (the
sections that belong to one part live with it: ``model`` in ``model/spec.py``, ``objective``
in ``model/objective.py``, ``crops`` in ``platform/data/augment.py``); a preset
(``platform/presets/NAME.yaml``) lists only what differs. Every key is checked: an unknown
key or a value of the wrong type fails at load time with the dotted key in the message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dinoforge.data.augment import MultiCropSpec
from dinoforge.model.objective import ObjectiveConfig
from dinoforge.model.spec import ModelConfig, official_spec

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "smoke"  # what commands run without --preset: the CPU-sized recipe


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(section, name)}")


@dataclass(frozen=True)
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 100
    epoch_length: int = 1250  # the official OFFICIAL_EPOCH_LENGTH: an "epoch" is a fixed number of steps
    base_lr: float = 0.004  # for a total batch of 1024 under the sqrt rule
    scaling_rule: str = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.scaling_rule not in ("sqrt_wrt_1024", "none"):
            raise ValueError(f"scaling_rule must be 'sqrt_wrt_1024' or 'none', got {self.scaling_rule!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"  # 'fashion-mnist[:train|test]', 'manifest:URI' or 'folder:URI'
    fashion_mnist_root: str = "/usr/share/datasets/fashion-mnist"
    num_workers: int = 2
    eval_crop_ratio: float = 0.875  # evaluation: resize the shorter side to size / ratio, centre crop (224 <- 256)
    io_threads: int = 8  # concurrent reads per loader worker (object-store latency overlaps)
    cache_bytes: int = 0  # per-worker LRU cache of image bytes; worth it when the data fits
    verify_hash: bool = True  # check each image's SHA-256 against the manifest
    max_image_pixels: int = 89_478_485  # larger images are skipped (PIL's decompression-bomb limit)
    min_image_side: int = 16  # images with a shorter side below this are skipped
    # JPEGs decode at a reduced DCT scale (1/2..1/8) while the shorter side stays >= this (0: full
    # size). At 448 the smallest default crop regions (5% / 32% of the area, aspect 3:4) keep
    # >= 87 / 219 px on their shorter side: at most 1.13x / 1.02x upsampling to 98 / 224 px.
    decode_short_side: int = 448
    max_substitutes: int = 16  # bad images replaced in a row before the run fails

    def __post_init__(self) -> None:
        _at_least(self, 1, "io_threads", "max_image_pixels", "min_image_side")
        _at_least(self, 0, "num_workers", "cache_bytes", "decode_short_side", "max_substitutes")


@dataclass(frozen=True)
class TrainConfig:
    batch_size_per_gpu: int = 64
    seed: int = 0
    log_period: int = 10
    checkpoint_period: int = 500
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # save in the background (DCP async save); training goes on
    # Compute precision: fp32 master weights and optimizer always; "bf16" computes in bfloat16
    # (FSDP param_dtype, or autocast in a single process). The official fp16 + loss scaling is
    # not offered: bf16 has fp32's range and needs no scaler.
    precision: str = "fp32"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile each transformer block, Sinkhorn-Knopp and the iBOT loss
    # Each head's prototype layer computed inside its loss, in row chunks, so the (rows, K)
    # logits and their fp32 log-softmax are never stored: the same loss with less memory
    # (losses.prototype_cross_entropy; effect in benchmarks/records/).
    fused_loss: bool = False
    fused_optimizer: bool = False  # AdamW as one fused kernel per step (torch.optim.AdamW(fused=True))
    # Weights to start from when the run has no checkpoint of its own (a run directory or a
    # checkpoint URI): e.g. the high-resolution stage continues a finished pretraining run.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        _at_least(self, 1, "batch_size_per_gpu", "log_period", "checkpoint_period", "keep_checkpoints")


@dataclass(frozen=True)
class DistillConfig:
    """Setting ``teacher`` turns a run into distillation (paper §5): the frozen teacher's
    targets train a student with no masking and no stochastic depth; the exported model is a
    spare EMA of the student."""

    teacher: str | None = None  # our run directory or checkpoint, or backbone weights (.pth)
    teacher_arch: str | None = None  # official .pth without our .json beside it: e.g. vit_large (patch 14, 518 px)
    teacher_registers: int = 0  # register tokens of such an official teacher
    head_seed: int = 0  # seed of the random frozen heads given to a teacher without heads
    # Constant momentum of the spare EMA; None: the ``teacher.*`` momentum schedule. That
    # schedule rises to 1.0, which freezes the EMA over the last steps: harmless over the
    # paper's long runs, but on a short run it exports a student from far back (smoke_distill,
    # 160 steps: EMA 60.9 vs student 64.7 k-NN top-1).
    ema_momentum: float | None = None

    def __post_init__(self) -> None:
        if self.teacher_arch is not None:
            official_spec(self.teacher_arch, self.teacher_registers)
        if self.ema_momentum is not None and not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    crops: MultiCropSpec = field(default_factory=MultiCropSpec)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def total_steps(self) -> int:
        return self.optim.epochs * self.optim.epoch_length

    @property
    def stage(self) -> str:
        """The training stage this config runs: ``distill`` when it names a teacher, else ``pretrain``."""
        return "distill" if self.distill.teacher else "pretrain"


# -- building dataclasses from plain data ----------------------------------------------
def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return build(annotation, value, prefix=f"{key}.")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config key '{key}' has an unsupported type {annotation!r}")
    raise ConfigError(f"config key '{key}' expects {annotation.__name__}, got {value!r}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiates dataclass ``cls`` from nested plain data, validating every key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (valid keys: {', '.join(sorted(names))})")
    kwargs = {key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid config section '{prefix.rstrip('.') or cls.__name__}': {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-friendly data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``optim.base_lr=1e-3`` -> {'optim': {'base_lr': 0.001}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form KEY=VALUE")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_data(preset: str, seen: list[str]) -> dict[str, Any]:
    """A preset's data; ``base: NAME`` at its top level starts from another preset."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}: expected one of {preset_names()} or a YAML file")
    if preset in seen:
        raise ConfigError(f"preset 'base' cycle: {' -> '.join(seen + [preset])}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    return _merge(_preset_data(base, seen + [preset]), data) if base else data


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name (or path to a YAML file) plus overrides -> validated ``Config``."""
    data = _preset_data(preset, []) if preset else {}
    for override in overrides:
        data = _merge(data, parse_override(override))
    return build(Config, data)
