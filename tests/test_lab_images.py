"""The lab image generator: deterministic pixels, the base/novel label order, disjoint splits."""
import hashlib

import numpy as np
import pytest

from gcs_tune.data import lab
from gcs_tune.data.lab import LAB_CLASSNAMES, lab_batch, lab_dataset, lab_image


def pixels(img):
    return np.asarray(img)


def test_image_is_32px_rgb():
    for domain in lab.DOMAINS:
        img = lab_image(domain, 5, 0, 0)
        assert img.mode == "RGB"
        assert img.size == (32, 32)
        assert pixels(img).dtype == np.uint8


def test_same_arguments_same_pixels():
    a = pixels(lab_image("downstream", 17, 3, 7))
    b = pixels(lab_image("downstream", 17, 3, 7))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("change", [
    {"index": 4}, {"seed": 8}, {"label": 18}, {"domain": "pretrain"},
])
def test_any_changed_argument_changes_pixels(change):
    args = {"domain": "downstream", "label": 17, "index": 3, "seed": 7}
    ref = pixels(lab_image(**args))
    other = pixels(lab_image(**{**args, **change}))
    assert not np.array_equal(ref, other)


def test_v1_downstream_rotates_hue_by_shape_sign():
    # Same draws, both domains: only the hue differs, by the shape's signed shift.
    labels = np.arange(len(LAB_CLASSNAMES))
    pre = lab._sample_params(np.random.default_rng(1), labels, "pretrain")
    down = lab._sample_params(np.random.default_rng(1), labels, "downstream", "v1")
    shift = down["hue"] - pre["hue"]
    assert np.allclose(shift, lab.HUE_SHIFT_DEG * lab.HUE_SIGN_BY_SHAPE[lab.LABEL_SHAPE])
    assert {1.0, -1.0} == set(np.sign(shift))
    for key in pre:
        if key != "hue":
            assert np.array_equal(pre[key], down[key]), key


# sha256 of the uint8 pixels of a few v1 images, recorded before the variants existed: v1's
# documented numbers refer to exactly these images.
V1_PIXELS = {("downstream", 17, 3, 7): "b53aa1a7", ("downstream", 40, 2000001, 0): "262c40f1",
             ("pretrain", 5, 0, 0): "4ff6f985"}


@pytest.mark.parametrize("args", sorted(V1_PIXELS))
def test_v1_pixels_unchanged(args):
    digest = hashlib.sha256(pixels(lab_image(*args, variant="v1")).tobytes()).hexdigest()[:8]
    assert digest == V1_PIXELS[args]


def test_v2_renames_pairs_of_same_shape_classes():
    off = lab.VARIANTS["v2"].hue_offset
    renamed = np.flatnonzero(off != 0)
    assert len(renamed) == 2 * lab.V2_SWAPS
    hue_of = lab.COLOUR_HUES[lab.LABEL_COLOUR]
    drawn = np.mod(hue_of + off, 360.0)
    for label in renamed:  # drawn in the colour of another class of its own shape, which is drawn in its colour
        partner = np.flatnonzero((lab.LABEL_SHAPE == lab.LABEL_SHAPE[label]) & np.isclose(hue_of, drawn[label]))
        assert len(partner) == 1 and partner[0] != label
        assert np.isclose(drawn[partner[0]], hue_of[label])
    assert len(set(np.round(drawn + 360 * lab.LABEL_SHAPE, 6))) == 64  # no two classes share shape and hue
    assert 0 < (off[:32] != 0).sum() and 0 < (off[32:] != 0).sum()  # both halves hold renamed classes


def test_v2_jitter_rescales_the_same_draws():
    labels = np.arange(len(LAB_CLASSNAMES))
    pre = lab._sample_params(np.random.default_rng(2), labels, "pretrain")
    down = lab._sample_params(np.random.default_rng(2), labels, "downstream", "v2")
    centre = lab.COLOUR_HUES[lab.LABEL_COLOUR]
    scale = lab.V2_HUE_JITTER / lab.HUE_JITTER_DEG
    assert np.allclose(down["hue"] - centre - lab.VARIANTS["v2"].hue_offset, scale * (pre["hue"] - centre))
    assert np.array_equal(pre["sat"], down["sat"])


def test_ids_name_the_variant_and_differ_between_variants():
    a, b = lab_dataset(test_per_class=1, variant="v1"), lab_dataset(test_per_class=1, variant="v2")
    assert all(i.startswith("lab-v1/") for i in a.test.ids)
    assert all(i.startswith("lab-v2/") for i in b.test.ids)
    assert not set(a.test.ids) & set(b.test.ids)
    renamed = int(np.flatnonzero(lab.VARIANTS["v2"].hue_offset != 0)[0])
    assert not np.array_equal(pixels(a.test.load(renamed)), pixels(b.test.load(renamed)))


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="variant"):
        lab_dataset(variant="v9")


def test_64_unique_class_names_colour_then_shape():
    assert len(LAB_CLASSNAMES) == 64
    assert len(set(LAB_CLASSNAMES)) == 64
    for name in LAB_CLASSNAMES:
        colour, shape = name.split(" ")
        assert colour in lab.COLOURS and shape in lab.SHAPES


def test_first_half_is_the_latin_square_base_set():
    for label, name in enumerate(LAB_CLASSNAMES):
        colour, shape = name.split(" ")
        s, c = lab.SHAPES.index(shape), lab.COLOURS.index(colour)
        assert ((s - c) % 8 < 4) == (label < 32), name


def test_every_word_in_both_halves():
    base, novel = LAB_CLASSNAMES[:32], LAB_CLASSNAMES[32:]
    for words in (lab.COLOURS, lab.SHAPES):
        for word in words:
            assert sum(word in n.split() for n in base) == 4
            assert sum(word in n.split() for n in novel) == 4


def test_dataset_splits_are_disjoint_and_sized():
    data = lab_dataset(seed=0, train_per_class=3, val_per_class=2, test_per_class=4)
    assert data.name == "lab"
    assert data.classnames == LAB_CLASSNAMES
    assert (len(data.train), len(data.val), len(data.test)) == (64 * 3, 64 * 2, 64 * 4)
    ids = [set(s.ids) for s in (data.train, data.val, data.test)]
    assert all(len(i) == n for i, n in zip(ids, (64 * 3, 64 * 2, 64 * 4)))  # unique inside
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for split in (data.train, data.val, data.test):
        assert sorted(set(split.labels)) == list(range(64))
        assert all(split.labels.count(k) == len(split) // 64 for k in range(64))


def test_dataset_images_match_their_ids_and_differ_across_splits():
    data = lab_dataset(seed=0, train_per_class=2, val_per_class=2, test_per_class=2)
    first = [pixels(s.load(0)) for s in (data.train, data.val, data.test)]  # all label 0
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])
    again = lab_dataset(seed=0, train_per_class=5)  # more shots: earlier images unchanged
    assert again.train.ids[:2] == data.train.ids[:2]
    assert np.array_equal(pixels(again.train.load(0)), first[0])
    assert np.array_equal(pixels(again.test.load(1)), pixels(data.test.load(1)))


def test_dataset_seed_changes_ids_and_pixels():
    a, b = lab_dataset(seed=0, test_per_class=1), lab_dataset(seed=1, test_per_class=1)
    assert not set(a.test.ids) & set(b.test.ids)
    assert not np.array_equal(pixels(a.test.load(0)), pixels(b.test.load(0)))


def test_batch_shapes_and_determinism():
    imgs, labels = lab_batch(np.random.default_rng(3), 16)
    again, labels2 = lab_batch(np.random.default_rng(3), 16)
    assert imgs.shape == (16, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.shape == (16,) and labels.min() >= 0 and labels.max() < 64
    assert np.array_equal(imgs, again) and np.array_equal(labels, labels2)


def test_foreground_has_the_class_colour():
    # A big, centred red shape on the pretrain domain: its brightest pixels are red-dominant.
    for index in range(5):
        img = pixels(lab_image("pretrain", LAB_CLASSNAMES.index("red square"), index, 0))
        bright = img[img.max(axis=-1) > 150].astype(int)
        assert len(bright) > 20
        assert (bright[:, 0] > bright[:, 1] + 40).mean() > 0.9


def test_unknown_domain_and_label_rejected():
    with pytest.raises(ValueError):
        lab_image("web", 0, 0, 0)
    with pytest.raises(ValueError):
        lab_image("pretrain", 64, 0, 0)
