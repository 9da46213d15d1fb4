"""Typed, frozen run configuration, loaded from YAML plus ``key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"`` and ``frozen=True``: an unknown key, a
wrong type or an out-of-range value fails at load with a :class:`ConfigError` that names the key
and the file, before anything is trained or written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gcs_tune.methods.table import METHODS


class ConfigError(ValueError):
    """A configuration that cannot be used. The CLIs turn it into one line and exit status 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: str = "lab"  # "lab", one of the 11 CoOp datasets, or "imagefolder"
    root: str | None = None  # dataset root; not used by the lab
    shots: int = Field(16, ge=1)  # train images per base class
    val_shots: int | None = Field(None, ge=1)  # None: min(shots, 4), the CoOp convention
    # Training augmentation (a seeded random resized crop + flip per draw, gcs_tune.data.augment):
    # "epoch" shows draw e at epoch e, a fresh crop every epoch as Dassl's loader (the papers');
    # K reuses draws 0..K-1, one picked per image per epoch (K encodings instead of one per epoch).
    views: int | str = 4
    # RandomResizedCrop scale range of the train views. None: CoOp's (0.08, 1) on real data; (0.5, 1)
    # on the lab, whose 32-px shapes do not survive an 8 % crop (CoOp base fell below zero-shot).
    crop_scale: tuple[float, float] | None = None
    cache_dir: str = "~/.cache/gcs_tune/features"
    split_seed: int = 0  # imagefolder without train/val/test folders: seed of the random split
    lab_test_per_class: int = Field(50, ge=1)
    # base_novel: the protocol (train on base, score base and novel). pseudo_novel: what a search
    # sees in honest selection -- the base classes only, split (seeded by pseudo_seed) into
    # pseudo-base (trained on) and pseudo-novel halves; novel classes are never read.
    split: Literal["base_novel", "pseudo_novel"] = "base_novel"
    pseudo_seed: int = 0
    lab_variant: str = "v2"  # construction of the lab's downstream domain (gcs_tune.data.lab.LAB_VARIANTS)

    @field_validator("views", mode="before")
    @classmethod
    def _views(cls, v: Any) -> int | str:
        if v == "epoch" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a positive number of views or 'epoch', got {v!r}")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        lo, hi = self.crop_scale_resolved
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.dataset != "lab" and self.root is None:
            raise ValueError(f"dataset {self.dataset!r} needs data.root (a folder)")
        return self

    @property
    def crop_scale_resolved(self) -> tuple[float, float]:
        if self.crop_scale is not None:
            return self.crop_scale
        return (0.5, 1.0) if self.dataset == "lab" else (0.08, 1.0)

    @property
    def val_shots_resolved(self) -> int:
        return self.val_shots if self.val_shots is not None else min(self.shots, 4)


class BackboneConfig(_Section):
    model: str = "lab"  # "lab" or an open_clip model name ("ViT-B-16")
    pretrained: str | None = None  # open_clip tag ("openai"), a checkpoint path, or None (random)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the GPU has it natively, else fp32
    # auto: the activation the pretrained tag was trained with (QuickGELU for every openai tag).
    # Set true for an OpenAI checkpoint given as a file: a file does not say.
    quick_gelu: Literal["auto"] | bool = "auto"
    cache_dir: str | None = None  # where open_clip finds (and downloads) tagged weights; None: the hub's default


class PromptConfig(_Section):
    n_ctx: int = Field(4, ge=1, le=64)
    init: str | None = "a photo of a"  # phrase whose word embeddings start the context; None: N(0, .02)
    class_specific: bool = False
    # The hand-crafted prompt (zero-shot reference, KgCoOp target). None: the dataset's own
    # template from CoOp's table (gcs_tune.data.templates), "a photo of a {}." where it has none.
    zero_shot_template: str | None = None
    # Deep prompts (PromptSRC, CasPL): vision tokens, and the number of blocks of each tower that
    # get new tokens (9 in PromptSRC on ViT-B/16; clipped to a tower's blocks: the lab's have 4).
    n_ctx_vision: int = Field(4, ge=1, le=64)
    depth: int = Field(9, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> "PromptConfig":
        if self.init is not None and not self.init.strip():
            raise ValueError("init must be a phrase or null")
        if self.zero_shot_template is not None and "{}" not in self.zero_shot_template:
            raise ValueError("zero_shot_template must contain {} where the class name goes")
        return self


class MethodConfig(_Section):
    name: str = "gcscoop"  # a row of gcs_tune.methods.METHODS
    rho: float = Field(0.1, ge=0.0)  # SAM / GCSAM perturbation radius
    beta1: float = Field(0.5, ge=-1.0, le=1.0)  # GCSAM: cos <= beta1 -> follow g
    beta2: float = Field(0.8, ge=-1.0, le=1.0)  # GCSAM: cos >= beta2 -> follow g_s
    kg_weight: float | None = Field(None, ge=0.0)  # KgCoOp text-consistency weight; None: the method's default
    # GCSAM decides g / projection / g_s per parameter tensor (the authors' code) or once over all
    # tensors joined. Identical for CoOp's single context tensor.
    cos_scope: Literal["per_tensor", "global"] = "per_tensor"
    # The SAM family's two gradients in fp32 even under bf16 autocast: at small rho, g_s - g is near
    # bf16 rounding and GCSAM's case choice would be noise. "autocast": backbone.precision.
    grad_precision: Literal["fp32", "autocast"] = "fp32"
    # SubPT: U from the context after each of the first subspace_epochs epochs (t_early), top
    # subspace_rank principal directions (r); the rule it wraps (the authors': SGD).
    subspace_rank: int = Field(10, ge=1)
    subspace_epochs: int = Field(30, ge=1)
    subspace_inner: Literal["sgd", "sam", "gcsam"] = "sgd"
    # NFL's extra class names: none, the run's novel names ("novel": a transductive use of the
    # novel vocabulary, as the authors' base-to-novel scripts), or a file with one name per line.
    nfl_names: str = "none"
    nfl_weight: float | None = Field(None, ge=0.0)  # λ; None: the method's default (1)
    # PromptSRC: weights of the L1 text / image consistency terms (None: 25 / 10) and the Gaussian
    # prompt aggregation over epochs, w_e ∝ N(e; gpa_mean, gpa_std).
    scl_text_weight: float | None = Field(None, ge=0.0)
    scl_image_weight: float | None = Field(None, ge=0.0)
    gpa_mean: float = 15.0
    gpa_std: float = Field(1.0, gt=0.0)
    # CasPL: the teacher (an open_clip name; lab-vit-teacher is shipped, pretrained None = its
    # packaged weights) and the boosting prompt's stage 1 (KL to the teacher's logits on the
    # unlabeled train images, temperature kd_temperature); trained once per seed boost_seed, cached.
    teacher_model: str = "lab-vit-teacher"
    teacher_pretrained: str | None = None
    kd_temperature: float = Field(1.0, gt=0.0)
    boost_n_ctx: int = Field(8, ge=1, le=64)
    boost_depth: int = Field(12, ge=1, le=64)
    boost_epochs: int = Field(20, ge=1)
    boost_batch_size: int = Field(4, ge=1)
    boost_lr: float = Field(0.0025, gt=0.0)
    boost_seed: int = 1
    boost_shots: int | None = Field(None, ge=1)  # unlabeled images per class for stage 1; None: all (theirs)

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        if self.beta2 < self.beta1:
            raise ValueError(f"beta2 ({self.beta2}) must be >= beta1 ({self.beta1})")
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; known: {', '.join(sorted(METHODS))}")
        if self.subspace_rank > self.subspace_epochs:
            raise ValueError(f"subspace_rank ({self.subspace_rank}) must be <= subspace_epochs "
                             f"({self.subspace_epochs}): U comes from that many snapshots")
        if self.nfl_names not in ("none", "novel") and not Path(self.nfl_names).expanduser().is_file():
            raise ValueError(f"nfl_names: {self.nfl_names}: no such file (none, novel, or a file of names)")
        if "nfl" in METHODS[self.name].losses and self.nfl_names == "none":
            raise ValueError(f"method {self.name} needs extra class names: method.nfl_names=novel (the "
                             "run's novel names, transductive) or a file with one name per line")
        return self


class OptimConfig(_Section):
    lr: float = Field(0.002, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    batch_size: int = Field(32, ge=1)


class ScheduleConfig(_Section):
    epochs: int = Field(50, ge=1)
    warmup_epochs: int = Field(1, ge=0)  # constant warmup_lr for this many epochs, then cosine
    warmup_lr: float = Field(1e-5, ge=0.0)


class EvalConfig(_Section):
    every: int = Field(1, ge=1)  # validate every N epochs (and always at the last one)
    test: bool = True  # measure the test split once, at the end (never used for selection)


class ObjectiveConfig(_Section):
    """HM with a base floor. ``absolute``: floor = value; ``zero_shot``: zero-shot base accuracy
    of the same backbone on the same validation data minus tolerance; ``reference``: ``value``
    is a reference base accuracy (the search fills it from a CoOp run) minus tolerance."""

    # How a search selects: pseudo_novel never reads a novel class (trials run with
    # data.split=pseudo_novel); all_classes scores trials on novel-class validation images.
    selection: Literal["pseudo_novel", "all_classes"] = "pseudo_novel"
    floor: Literal["none", "absolute", "zero_shot", "reference"] = "zero_shot"
    value: float | None = Field(None, ge=0.0, le=100.0)
    tolerance: float = Field(0.0, ge=0.0, le=100.0)
    penalty: float = Field(1.0, gt=0.0)  # objective units per point of base accuracy below the floor

    @model_validator(mode="after")
    def _check(self) -> "ObjectiveConfig":
        if self.floor in ("absolute", "reference") and self.value is None:
            raise ValueError(f"floor {self.floor!r} needs objective.value")
        return self


class RunConfig(_Section):
    seed: int = 1
    out: str | None = None  # output folder of gcs_tune.train
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    prompt: PromptConfig = PromptConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    objective: ObjectiveConfig = ObjectiveConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, **dotted: Any) -> "RunConfig":
        """A copy with ``{"method.rho": 0.2, ...}`` applied and validated again."""
        return build_config(self.to_dict(), dotted, source="<replace>")

    def for_search(self) -> "RunConfig":
        """What a search trial trains on. ``pseudo_novel`` selection: the base classes split in
        pseudo-base and pseudo-novel halves, no test split (novel classes are never read)."""
        if self.objective.selection == "pseudo_novel":
            return self.replace(**{"data.split": "pseudo_novel", "eval.test": False})
        return self.replace(**{"data.split": "base_novel"})

    def for_protocol(self) -> "RunConfig":
        """What a chosen config is reported on: trained on every base class, tested on the test
        split's base and novel classes."""
        return self.replace(**{"data.split": "base_novel", "eval.test": True, "out": None})


# ---------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["method.rho=0.2", "prompt.init=null"]`` -> ``{"method.rho": 0.2, "prompt.init": None}``.

    Values are parsed as YAML scalars, so numbers, booleans, null and lists work as in a file."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. method.rho=0.2")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return parsed


def build_config(tree: dict[str, Any], overrides: dict[str, Any] | None = None,
                 source: str = "<config>") -> RunConfig:
    """Validate a nested dict (plus dotted overrides) into a :class:`RunConfig`."""
    tree = _deep_copy(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value, source)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load YAML at ``path`` (None: the defaults, i.e. the embedded lab) and apply overrides."""
    if path is None:
        return build_config({}, overrides, source="<defaults>")
    path = Path(path)
    tree = read_yaml(path)
    return build_config(tree, overrides, source=str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}
