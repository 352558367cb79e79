import numpy as np
import pytest
import torch
from PIL import Image

from msf.data import (FLIP_ID_MAP, PALETTE, CelebAMaskHQDataset, DataError, MiniFaceDataset, SyntheticFaces,
                      augment_batch, open_dataset, read_mask, sample_augment_params, sample_params_for,
                      sample_uniforms, write_mask)


def identity_params(n=1, **overrides):
    params = {"flip": torch.zeros(n, dtype=torch.bool), "angle": torch.zeros(n, dtype=torch.float64),
              "scale": torch.ones(n, dtype=torch.float64), "brightness": torch.ones(n, dtype=torch.float64),
              "contrast": torch.ones(n, dtype=torch.float64), "saturation": torch.ones(n, dtype=torch.float64)}
    params.update({k: torch.as_tensor(v) for k, v in overrides.items()})
    return params


def palette_pair(size=64, seed=0):
    """A synthetic mask and an image whose colour is exactly its class's palette colour."""
    _, mask = SyntheticFaces(1, size, seed).load_pair(0)
    image = torch.from_numpy(PALETTE[mask]).permute(2, 0, 1)[None].float() / 255
    return image, torch.from_numpy(mask)[None].long()


# --- synthetic generator ------------------------------------------------------------------------

def test_synthetic_faces_are_deterministic_per_seed():
    a, b, c = SyntheticFaces(4, 64, seed=3), SyntheticFaces(4, 64, seed=3), SyntheticFaces(4, 64, seed=4)
    for i in range(4):
        (ia, ma), (ib, mb), (ic, _) = a.load_pair(i), b.load_pair(i), c.load_pair(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
        assert not np.array_equal(ia, ic)


def test_synthetic_faces_cover_every_class():
    ds = SyntheticFaces(64, 96, seed=0)
    seen = set()
    for i in range(len(ds)):
        image, mask = ds.load_pair(i)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and mask.shape == (96, 96)
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(19))


def test_synthetic_left_parts_sit_on_the_image_right():
    for i in range(8):
        _, mask = SyntheticFaces(8, 128, seed=1).load_pair(i)
        cols = np.arange(128)
        for left, right in ((4, 5), (6, 7)):
            assert cols[np.nonzero(mask == left)[1]].mean() > cols[np.nonzero(mask == right)[1]].mean()


# --- augmentation -------------------------------------------------------------------------------

def test_identity_augmentation_changes_nothing():
    image, mask = palette_pair()
    out_image, out_mask = augment_batch(image, mask, identity_params())
    assert torch.allclose(out_image, image, atol=1e-5)
    assert torch.equal(out_mask, mask)


def test_flip_mirrors_and_swaps_left_right_ids():
    image, mask = palette_pair()
    out_image, out_mask = augment_batch(image, mask, identity_params(flip=[True]))
    assert torch.allclose(out_image, image.flip(-1), atol=1e-5)
    assert torch.equal(out_mask, FLIP_ID_MAP[mask.flip(-1)])
    assert FLIP_ID_MAP.tolist() == [0, 1, 2, 3, 5, 4, 7, 6, 9, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18]


def test_geometric_warp_keeps_image_and_mask_aligned():
    image, mask = palette_pair(96, seed=2)
    params = identity_params(flip=[True], angle=[0.2], scale=[1.08])
    out_image, out_mask = augment_batch(image, mask, params)
    assert set(out_mask.unique().tolist()) <= set(FLIP_ID_MAP[mask.unique()].tolist()) | {0}
    # Where the warped mask says class c, the warped image shows class FLIP(c)'s original colour
    # (the colour travelled with the pixel; the id was swapped). Edges interpolate, so use a majority.
    expected = torch.from_numpy(PALETTE).float()[FLIP_ID_MAP[out_mask[0]]] / 255
    close = (out_image[0].permute(1, 2, 0) - expected).abs().max(dim=-1).values < 0.02
    assert close.float().mean() > 0.9


def test_color_jitter_leaves_the_mask_alone_and_stays_in_range():
    image, mask = palette_pair()
    out_image, out_mask = augment_batch(image, mask, identity_params(brightness=[1.2], contrast=[0.8],
                                                                     saturation=[1.1]))
    assert torch.equal(out_mask, mask)
    assert out_image.min() >= 0 and out_image.max() <= 1 and not torch.allclose(out_image, image)


@pytest.mark.parametrize("draw", ["generator", "per-sample streams"])
def test_augmentation_parameters_stay_in_spec_ranges(draw):
    p = (sample_augment_params(4000, torch.Generator().manual_seed(0)) if draw == "generator"
         else sample_params_for(seed=3, epoch=7, indices=range(4000)))
    assert 0.45 < p["flip"].double().mean() < 0.55
    assert p["angle"].abs().max() <= np.deg2rad(15) + 1e-12
    assert p["scale"].min() >= 0.9 and p["scale"].max() <= 1.1
    assert p["brightness"].min() >= 0.8 and p["contrast"].max() <= 1.2
    assert p["saturation"].min() >= 0.9 and p["saturation"].max() <= 1.1


def test_per_sample_uniforms_depend_on_seed_epoch_and_index_only():
    whole = sample_uniforms(11, 2, range(50))
    assert np.array_equal(sample_uniforms(11, 2, [40, 7])[:, :], whole[[40, 7]])  # any subset, any order
    assert not np.array_equal(sample_uniforms(11, 3, range(50)), whole)
    assert not np.array_equal(sample_uniforms(12, 2, range(50)), whole)
    big = sample_uniforms(0, 0, range(100_000))
    assert ((0 <= big) & (big < 1)).all()
    assert np.allclose(big.mean(axis=0), 0.5, atol=0.005) and np.allclose(big.var(axis=0), 1 / 12, atol=0.002)
    assert np.abs(np.corrcoef(big.T) - np.eye(6)).max() < 0.01  # the six columns are independent


def test_dataset_augmentation_depends_on_seed_epoch_and_index_only():
    ds = SyntheticFaces(2, 64, seed=0, augment=True)
    first = ds[1]
    ds.set_epoch(1)
    other_epoch = ds[1]
    ds.set_epoch(0)
    again = ds[1]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other_epoch[0])


# --- the mini layout and its errors -------------------------------------------------------------

def make_mini(root, n=3, size=64, split="train"):
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for i in range(n):
        image, mask = SyntheticFaces(n, size, seed=5).load_pair(i)
        Image.fromarray(image).save(root / split / "images" / f"f{i}.jpg")
        write_mask(root / split / "masks" / f"f{i}.png", mask)
    return root


def test_mini_layout_loads_and_resizes(tmp_path):
    root = make_mini(tmp_path)
    ds = open_dataset(root, "train", image_size=32)
    assert isinstance(ds, MiniFaceDataset) and len(ds) == 3
    image, mask = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    native = MiniFaceDataset(root, "train")
    assert native[2][1].shape == (64, 64)
    # palette PNG round trip keeps ids
    _, original = SyntheticFaces(3, 64, seed=5).load_pair(2)
    assert np.array_equal(read_mask(root / "train" / "masks" / "f2.png"), original)


def test_image_without_mask_names_the_file(tmp_path):
    root = make_mini(tmp_path)
    (root / "train" / "masks" / "f1.png").unlink()
    with pytest.raises(DataError, match="f1.jpg: image has no mask"):
        MiniFaceDataset(root, "train")


def test_mask_id_above_18_names_the_file(tmp_path):
    root = make_mini(tmp_path)
    bad = np.zeros((64, 64), dtype=np.uint8)
    bad[3, 3] = 19
    Image.fromarray(bad, mode="L").save(root / "train" / "masks" / "f0.png")
    with pytest.raises(DataError, match=r"f0.png: mask holds class id 19"):
        MiniFaceDataset(root, "train")[0]


def test_size_mismatch_names_the_file(tmp_path):
    root = make_mini(tmp_path)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "images" / "f2.jpg")
    with pytest.raises(DataError, match=r"f2.jpg: image is 32×32 but its mask f2.png is 64×64"):
        MiniFaceDataset(root, "train")[2]


def test_corrupt_file_names_the_file(tmp_path):
    root = make_mini(tmp_path)
    (root / "train" / "images" / "f1.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="f1.jpg: unreadable image"):
        MiniFaceDataset(root, "train")[1]
    (root / "train" / "masks" / "f0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="f0.png: unreadable mask"):
        MiniFaceDataset(root, "train")[0]


def test_rgb_mask_is_rejected(tmp_path):
    root = make_mini(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "train" / "masks" / "f0.png")
    with pytest.raises(DataError, match="f0.png: mask must be a palette or greyscale"):
        MiniFaceDataset(root, "train")[0]


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    with pytest.raises(DataError, match="no images"):
        MiniFaceDataset(tmp_path, "train")
    with pytest.raises(DataError, match="'val' split folder not found"):
        MiniFaceDataset(tmp_path, "val")
    with pytest.raises(DataError, match="data folder not found"):
        open_dataset(tmp_path / "nowhere", "train", 64)
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="not a data set folder"):
        open_dataset(tmp_path / "junk", "train", 64)


# --- the original CelebAMask-HQ layout ----------------------------------------------------------

def test_original_layout_merges_parts_in_order(tmp_path):
    (tmp_path / "CelebA-HQ-img").mkdir()
    anno = tmp_path / "CelebAMask-HQ-mask-anno" / "0"
    anno.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "CelebA-HQ-img" / "7.jpg")

    def part(name, rows):
        layer = np.zeros((32, 32), np.uint8)
        layer[rows] = 255
        Image.fromarray(layer).save(anno / f"00007_{name}.png")

    part("skin", slice(0, 20))
    part("hair", slice(10, 16))   # paints over skin (later in the order)
    part("cloth", slice(28, 32))
    ds = open_dataset(tmp_path, "train", None)
    assert isinstance(ds, CelebAMaskHQDataset) and ds.ids == [7]
    image, mask = ds.load_pair(0)
    assert image.shape == (32, 32, 3)  # resized to the mask size
    assert (mask[0:10] == 1).all() and (mask[10:16] == 13).all() and (mask[16:20] == 1).all()
    assert (mask[20:28] == 0).all() and (mask[28:] == 18).all()
    with pytest.raises(DataError, match="no part masks"):
        CelebAMaskHQDataset(tmp_path, ids=[8])


# --- the real data ------------------------------------------------------------------------------

def test_every_real_val_pair_loads_with_valid_ids(real_data):
    ds = MiniFaceDataset(real_data, "val")
    assert len(ds) == 100
    for i in range(len(ds)):
        image, mask = ds.load_pair(i)
        assert image.shape == (512, 512, 3) and mask.shape == (512, 512)
        assert mask.max() <= 18
    assert len(MiniFaceDataset(real_data, "train")) == 800
