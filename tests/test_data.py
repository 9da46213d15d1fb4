"""Readers, few-shot sampling and the feature cache, on small folders made by the tests."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gcs_tune.data.cache import CachedFeatures, FeatureCache
from gcs_tune.data.extract import encode_images
from gcs_tune.data.fewshot import DataError, base_novel_split, sample_few_shot
from gcs_tune.data.readers import read_coop, read_imagefolder
from gcs_tune.data.types import ImageSet

to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731


def image(path, value):
    """An 8x8 image: a level set by ``value`` plus a gradient, so that crops differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.add.outer(np.arange(8), 2 * np.arange(8))[..., None] * 6  # (8, 8, 1)
    Image.fromarray(np.clip(value + ramp, 0, 255).astype(np.uint8).repeat(3, axis=2)).save(path)


def make_coop_dtd(root, classes=("banded", "blotchy", "braided"), per_split=3):
    base = root / "dtd"
    rows = {s: [] for s in ("train", "val", "test")}
    for y, name in enumerate(classes):
        for split in rows:
            for i in range(per_split):
                rel = f"{name}/{split}_{i}.jpg"
                image(base / "images" / rel, 10 * y + i)
                rows[split].append([rel, y, name])
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps(rows))
    return base


def test_coop_layout(tmp_path):
    make_coop_dtd(tmp_path)
    ds = read_coop(tmp_path, "dtd")
    assert ds.classnames == ("banded", "blotchy", "braided")
    assert len(ds.train) == len(ds.val) == len(ds.test) == 9
    assert ds.train.load(0).size == (8, 8) and ds.train.labels[:3] == (0, 0, 0)


def test_coop_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "dtd")):
        read_coop(tmp_path, "dtd")
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json: split file not found"):
        read_coop(tmp_path, "dtd")
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        read_coop(tmp_path, "mnist")


def test_an_unknown_aircraft_variant_names_the_split_file(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    base.mkdir()
    (base / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "val", "test"):
        (base / f"images_variant_{split}.txt").write_text("0001 707-320\n0002 A300B4\n")
    assert read_coop(tmp_path, "fgvc_aircraft").train.labels == (0, 1)
    (base / "images_variant_val.txt").write_text("0003 Concorde\n")
    with pytest.raises(DataError, match="images_variant_val.txt: variant 'Concorde' of image 0003"):
        read_coop(tmp_path, "fgvc_aircraft")


def test_imagefolder_seeded_split(tmp_path):
    for name in ("cat", "dog"):
        for i in range(10):
            image(tmp_path / "pets" / name / f"{i}.png", i)
    a, b = read_imagefolder(tmp_path / "pets", seed=3), read_imagefolder(tmp_path / "pets", seed=3)
    assert a.classnames == ("cat", "dog")
    assert a.train.ids == b.train.ids and (len(a.train), len(a.val), len(a.test)) == (12, 2, 6)
    assert not set(a.train.ids) & set(a.test.ids)
    with pytest.raises(DataError, match="no class folders"):
        read_imagefolder(tmp_path / "pets" / "cat")


def test_few_shot_is_seeded_and_checks_counts():
    labels = tuple(y for y in range(4) for _ in range(6))
    images = ImageSet(tuple(f"img{i}" for i in range(24)), labels, lambda i: None)
    a = sample_few_shot(images, 3, seed=1, where="x")
    assert a.ids == sample_few_shot(images, 3, seed=1, where="x").ids
    assert a.ids != sample_few_shot(images, 3, seed=2, where="x").ids
    assert sorted(a.labels) == [y for y in range(4) for _ in range(3)]
    assert set(sample_few_shot(images, 2, 1, "x", labels=range(0, 2)).labels) == {0, 1}
    with pytest.raises(DataError, match="somewhere: class 0 has 6 images, fewer than shots=7"):
        sample_few_shot(images, 7, 1, "somewhere")


def test_val_drawn_from_the_train_pool_never_repeats_a_training_image():
    labels = tuple(y for y in range(2) for _ in range(6))
    pool = ImageSet(tuple(f"img{i}" for i in range(12)), labels, lambda i: None)
    train = sample_few_shot(pool, 4, seed=1, where="x")
    val = sample_few_shot(pool, 2, seed=1, where="x", exclude=frozenset(train.ids))
    assert not set(train.ids) & set(val.ids) and sorted(val.labels) == [0, 0, 1, 1]
    with pytest.raises(DataError, match="class 0 has 2 images, fewer than shots=3"):
        sample_few_shot(pool, 3, seed=1, where="x", exclude=frozenset(train.ids))


def test_base_novel_split_is_first_half_by_label():
    assert base_novel_split(5) == (range(0, 3), range(3, 5))
    assert base_novel_split(64) == (range(0, 32), range(32, 64))


def test_a_bad_image_is_skipped_and_counted(tmp_path, caplog):
    make_coop_dtd(tmp_path)
    (tmp_path / "dtd" / "images" / "banded" / "train_1.jpg").write_bytes(b"not a jpeg")
    ds = read_coop(tmp_path, "dtd")
    found = encode_images(ds.train, to_tensor, lambda x: x.mean(dim=(2, 3)))
    assert len(found.ids) == 8 and "banded/train_1.jpg" not in found.ids
    assert "1 of 9 images could not be read" in caplog.text
    with pytest.raises(DataError, match="none of the 1 images decoded .the first is banded/train_1.jpg"):
        encode_images(ds.train.subset([1]), to_tensor, lambda x: x.mean(dim=(2, 3)))


def test_cache_hit_atomic_and_corruption_rebuilt(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return CachedFeatures(("a", "b"), torch.arange(6, dtype=torch.float32).view(2, 3))

    key = {"split": "val", "model": "m"}
    first, hit = cache.get_or_compute(key, compute)
    again, hit2 = cache.get_or_compute(key, compute)
    assert (hit, hit2, len(calls)) == (False, True, 1)
    assert again.ids == ("a", "b") and torch.equal(again.features, first.features)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".parquet"  # no temporary file left behind
    meta = json.loads(pq.read_schema(files[0]).metadata[b"gcs_tune"])
    assert meta["key"]["model"] == "m" and meta["rows"] == 2
    files[0].write_bytes(files[0].read_bytes()[:40])  # a torn file, as from a crash mid-copy
    rebuilt, hit3 = cache.get_or_compute(key, compute)
    assert not hit3 and len(calls) == 2 and torch.equal(rebuilt.features, first.features)
    cache.get_or_compute({"split": "val", "model": "other"}, compute)
    assert len(calls) == 3  # another backbone never reuses these features


def test_cache_files_are_private_unless_the_folder_is_shared_on_purpose(tmp_path):
    import stat as st

    def make():
        return CachedFeatures(("a",), torch.zeros(1, 3))

    private, shared = tmp_path / "mine", tmp_path / "team"
    private.mkdir(mode=0o755)
    shared.mkdir()
    shared.chmod(0o2770)  # what a team does for a shared cache
    for folder in (private, shared):
        FeatureCache(folder).get_or_compute({"split": "val"}, make)
    modes = [st.S_IMODE(next(f.glob("*.parquet")).stat().st_mode) for f in (private, shared)]
    assert modes == [0o600, 0o640]
