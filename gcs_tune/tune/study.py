"""Where a study lives and what it was: the folder layout, the saved settings (``study.yaml``),
and the path rules that must hold before Ray starts.

``<storage>/<name>/`` is Ray's experiment folder; beside Ray's own files the driver keeps
``study.yaml`` (everything ``--resume`` and ``gcs_tune.best`` need), ``space.yaml`` (a copy),
``trials.parquet``, ``optuna.db`` (the study as Optuna storage), ``optuna.yaml`` (the searcher's
summary), ``plots/`` and, by default, ``mlflow.db`` + ``mlartifacts/``.
When ``--storage`` is a URI (s3://, gs://), those files are kept in a local mirror and uploaded.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from gcs_tune.config import ConfigError, RunConfig, build_config

# Not .json/.pkl: on Tuner.restore Ray copies every top-level *.json and *.pkl of the experiment
# folder into its staging folder and syncs them back at each snapshot -- a driver file with those
# extensions would be reverted to its state at restore time.
STUDY_FILE = "study.yaml"
MIRROR_ROOT = Path("~/.cache/gcs_tune/studies").expanduser()
LOCK_FILE = ".driver.lock"  # held by the driver of a running study (fcntl): one driver per study


def is_uri(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def resolve_storage(storage: str) -> str:
    """An absolute path (``~`` expanded, ``file://`` stripped) or the URI unchanged."""
    if is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())


class StudyDir:
    """The study's own files: written to ``local``, uploaded to the storage URI if there is one."""

    def __init__(self, storage: str, name: str):
        self.storage, self.name = storage, name
        self.remote = f"{storage}/{name}" if is_uri(storage) else None
        self.local = (MIRROR_ROOT / name) if self.remote else Path(storage) / name

    @property
    def ray_path(self) -> str:
        """Ray's experiment folder (path or URI)."""
        return self.remote or str(self.local)

    def write(self, rel: str, data: bytes | str) -> Path:
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
        self.upload(rel)
        return path

    def upload(self, rel: str) -> None:
        if self.remote:
            fs, root = pafs.FileSystem.from_uri(self.remote)
            fs.create_dir(str(Path(root, rel).parent), recursive=True)
            with fs.open_output_stream(f"{root}/{rel}") as out:
                out.write((self.local / rel).read_bytes())

    def read(self, rel: str) -> bytes | None:
        if self.remote:
            fs, root = pafs.FileSystem.from_uri(self.remote)
            if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(f"{root}/{rel}") as src:
                return src.read()
        path = self.local / rel
        return path.read_bytes() if path.is_file() else None

    def exists(self) -> bool:
        return self.read(STUDY_FILE) is not None

    def lock(self) -> "StudyLock":
        return StudyLock(self.local / LOCK_FILE, self.name)

    def driver_running(self) -> bool:
        """Whether a driver holds the study's lock now (a search or a resume is writing it)."""
        try:
            fd = os.open(self.local / LOCK_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


class StudyLock:
    """One driver per study: an exclusive ``flock`` on ``<study>/.driver.lock`` held for the whole
    search. The kernel drops it when the driver dies (even by SIGKILL), so ``--resume`` after a
    crash is never refused, while a second ``--resume`` of a running study is. (On a remote
    storage URI the lock guards the local mirror: one host.)"""

    def __init__(self, path: Path, name: str):
        self.path, self.name, self._fd = path, name, None

    def __enter__(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"study {self.name!r} is being run by another driver ({holder}); wait for it to "
                              f"finish or stop it before --resume (two drivers would run every trial twice)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:  # a start that wrote nothing
                self.path.unlink()
                self.path.parent.rmdir()
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@dataclass
class StudyInfo:
    """The settings of a study (``study.yaml``), saved before Ray runs a trial; ``--resume`` uses these, not the
    command line, so a resumed study is the same study."""

    name: str
    storage: str
    space_path: str
    space: dict[str, Any]  # the validated space file (SpaceFile.model_dump)
    base: dict[str, Any]  # base run config, paths absolute, objective.value filled in
    overrides: dict[str, Any]
    trials: int
    gpus: float  # GPUs the search may use; 0: CPU trials
    resources: dict[str, float]  # what one trial asks Ray for
    max_concurrent: int
    tracking_uri: str
    experiment: str
    optuna_storage: str = ""  # an RDB URL for the study's Optuna storage; "": <study>/optuna.db
    parent_run_id: str = ""
    reference: dict[str, Any] | None = None  # the CoOp reference run: base/novel/hm, run id
    reference_pending: bool = False  # floor=reference and the reference has not run yet
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    def save(self, study: StudyDir) -> None:
        study.write(STUDY_FILE, yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, study: StudyDir) -> "StudyInfo":
        raw = study.read(STUDY_FILE)
        if raw is None:
            raise ConfigError(f"{study.ray_path}: no study here ({STUDY_FILE} missing)")
        return cls(**yaml.safe_load(raw))

    def base_config(self) -> RunConfig:
        return build_config(self.base, source=f"{self.name}/{STUDY_FILE}")


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Every path of a run config made absolute: trials run in Ray's temp directory."""
    changes: dict[str, Any] = {"data.cache_dir": str(Path(cfg.data.cache_dir).expanduser().resolve())}
    if cfg.backbone.cache_dir:
        changes["backbone.cache_dir"] = str(Path(cfg.backbone.cache_dir).expanduser().resolve())
    if cfg.data.root:
        changes["data.root"] = str(Path(cfg.data.root).expanduser().resolve())
    pre = cfg.backbone.pretrained
    if pre and ("/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))) and "://" not in pre:
        changes["backbone.pretrained"] = str(Path(pre).expanduser().resolve())
    if cfg.out:
        changes["out"] = str(Path(cfg.out).expanduser().resolve())
    return cfg.replace(**changes)


def latest_study(storage: str) -> str | None:
    """Name of the most recently created study under a local storage folder."""
    root = Path(storage)
    if is_uri(storage) or not root.is_dir():
        return None
    found = [p for p in root.iterdir() if (p / STUDY_FILE).is_file()]
    return max(found, key=lambda p: (p / STUDY_FILE).stat().st_mtime).name if found else None
