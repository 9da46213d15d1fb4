"""Frozen-feature cache: image features computed once, stored as Parquet, trusted only if whole.

A file holds the features of one (backbone, weights, dataset, split, transform/view, image list).
Its name is a hash of that key and the key is repeated in the Parquet schema metadata, so a file
whose key, ids or shape disagree with the request is rebuilt rather than used. Writes go to a
temporary file in the same folder and are renamed into place: a killed process leaves at most a
stray ``.tmp`` file, never a half file under a trusted name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CachedFeatures:
    ids: tuple[str, ...]  # the images that decoded; a bad image is skipped and counted
    features: torch.Tensor  # (N, D) float32, as the encoder returned them (not normalised)


def ids_digest(ids: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def file_mode(folder: Path) -> int:
    """0600: features of a private dataset stay private. A cache folder made group-writable on
    purpose (``chmod 2770``: a team's shared cache) gets 0640, so the group reuses the features."""
    return 0o640 if folder.stat().st_mode & stat.S_IWGRP else 0o600


class FeatureCache:
    """Parquet files under ``root``, one per key. ``root=None`` keeps nothing (always computes)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root is not None else None

    def path_for(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / f"{key.get('split', 'features')}-{digest}.parquet"

    def get_or_compute(self, key: dict[str, Any],
                       compute: Callable[[], CachedFeatures]) -> tuple[CachedFeatures, bool]:
        """The cached features for ``key`` (and True), else ``compute()`` stored (and False)."""
        key = {**key, "format": FORMAT_VERSION}
        if self.root is None:
            return compute(), False
        path = self.path_for(key)
        cached = self._read(path, key)
        if cached is not None:
            return cached, True
        result = compute()
        self._write(path, key, result)
        return result, False

    def _read(self, path: Path, key: dict[str, Any]) -> CachedFeatures | None:
        if not path.exists():
            return None
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"gcs_tune"])
            if meta["key"] != json.loads(json.dumps(key)):
                raise ValueError("key differs")
            ids = tuple(table.column("id").to_pylist())
            flat = table.column("feature").combine_chunks().flatten().to_numpy()
            feats = torch.from_numpy(flat.reshape(len(ids), meta["dim"]).astype(np.float32))
            if len(ids) != meta["rows"] or not torch.isfinite(feats).all():
                raise ValueError("row count or values are wrong")
            return CachedFeatures(ids, feats)
        except Exception as exc:  # any damage: say so and rebuild, never trust the file
            log.warning("feature cache %s is unusable (%s); rebuilding it", path, exc)
            return None

    def _write(self, path: Path, key: dict[str, Any], result: CachedFeatures) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        n, dim = result.features.shape
        values = pa.array(result.features.detach().float().cpu().numpy().reshape(-1))
        table = pa.table({
            "id": pa.array(result.ids, pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(values, dim),
        })
        meta = {"key": key, "rows": n, "dim": dim}
        table = table.replace_schema_metadata({b"gcs_tune": json.dumps(meta).encode()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.chmod(tmp, file_mode(path.parent))
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
