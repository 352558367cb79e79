"""Input pipelines: batch plans, the uint8 cache, and the device pipeline against the CPU loader."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from msf.data import (AugmentConfig, CelebAMaskHQDataset, DataError, MiniFaceDataset, SyntheticFaces, augment_batch,
                      sample_params_for, write_mask)
from msf.pipeline import (DeviceBatches, LoaderBatches, cache_key, decode_dataset, eval_plan, load_uint8_cache,
                          train_plan)


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------

def test_train_plan_shuffles_per_epoch_and_drops_the_last_incomplete_batch():
    plans = [train_plan(10, 4, seed=3, epoch=e) for e in range(3)]
    for plan in plans:
        assert [len(b) for b in plan] == [4, 4]
        assert len(set(i for b in plan for i in b)) == 8
    assert plans[0] != plans[1] and train_plan(10, 4, seed=3, epoch=1) == plans[1]
    assert train_plan(3, 8, seed=0, epoch=0)[0] and sorted(train_plan(3, 8, 0, 0)[0]) == [0, 1, 2]


@pytest.mark.parametrize("world", [2, 4])
def test_process_shares_put_together_give_the_single_process_batches(world):
    single = train_plan(37, 8, seed=5, epoch=2)
    shares = [train_plan(37, 8, seed=5, epoch=2, rank=r, world=world) for r in range(world)]
    assert all(len(s) == len(single) for s in shares)
    for b, batch in enumerate(single):
        assert [i for s in shares for i in s[b]] == batch
        assert {len(s[b]) for s in shares} == {8 // world}


def test_process_count_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        train_plan(40, 8, seed=0, epoch=0, rank=0, world=3)


def test_eval_shares_cover_every_sample_once_in_order():
    shares = [eval_plan(23, 4, rank=r, world=3) for r in range(3)]
    flat = [i for s in shares for b in s for i in b]
    assert flat == list(range(23))
    assert all(len(b) <= 4 for s in shares for b in s)


# ----------------------------------------------------------------------------------------------
# The uint8 cache
# ----------------------------------------------------------------------------------------------

def make_mini(root, n=4, size=64, split="train", seed=0):
    faces = SyntheticFaces(n, size, seed=seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    for i in range(n):
        image, mask = faces.load_pair(i)
        Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
        write_mask(root / split / "masks" / f"{i:03d}.png", mask)
    return root


def test_cache_holds_what_the_data_set_decodes_and_is_read_back(tmp_path):
    dataset = MiniFaceDataset(make_mini(tmp_path / "d"), "train", image_size=32)
    built = load_uint8_cache(dataset, tmp_path / "cache")
    for i in range(len(dataset)):
        image, mask = dataset.load_pair(i)
        assert torch.equal(built.images[i], torch.from_numpy(image).permute(2, 0, 1))
        assert torch.equal(built.masks[i], torch.from_numpy(mask))
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = cache_key(dataset)
    assert files == [f"{key}.images.npy", f"{key}.json", f"{key}.masks.npy"]
    read = load_uint8_cache(dataset, tmp_path / "cache")
    assert torch.equal(read.images, built.images) and torch.equal(read.masks, built.masks)


def test_cache_key_changes_with_a_file_or_the_size(tmp_path):
    root = make_mini(tmp_path / "d")
    key = cache_key(MiniFaceDataset(root, "train", image_size=32))
    assert cache_key(MiniFaceDataset(root, "train", image_size=64)) != key
    mask = root / "train" / "masks" / "002.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    assert cache_key(MiniFaceDataset(root, "train", image_size=32)) != key
    assert cache_key(SyntheticFaces(4, 32, seed=1)) != cache_key(SyntheticFaces(4, 32, seed=2))


def test_a_damaged_cache_is_decoded_again_not_trusted(tmp_path, capsys):
    dataset = SyntheticFaces(3, 32, seed=4)
    good = load_uint8_cache(dataset, tmp_path)
    images_file = tmp_path / f"{cache_key(dataset)}.images.npy"
    images_file.write_bytes(images_file.read_bytes()[:200])  # truncated
    again = load_uint8_cache(dataset, tmp_path)
    assert "decoding again" in capsys.readouterr().out
    assert torch.equal(again.images, good.images)
    meta = tmp_path / f"{cache_key(dataset)}.json"
    meta.write_text(json.dumps({"shapes": [[1, 2], [3]]}))
    assert torch.equal(load_uint8_cache(dataset, tmp_path).images, good.images)


def test_images_of_different_sizes_name_the_file(tmp_path):
    root = make_mini(tmp_path / "d", n=3)
    odd = root / "train" / "images" / "001.png"
    Image.open(odd).resize((48, 48)).save(odd)
    odd_mask = root / "train" / "masks" / "001.png"
    mask = Image.open(odd_mask)
    mask.resize((48, 48), Image.NEAREST).save(odd_mask)
    with pytest.raises(DataError, match="001.png.*differs from the first"):
        decode_dataset(MiniFaceDataset(root, "train"))


# ----------------------------------------------------------------------------------------------
# Device pipeline against the per-sample loader
# ----------------------------------------------------------------------------------------------

def pipelines(device, n=10, size=32, batch=4, seed=7, augment=True):
    dataset = SyntheticFaces(n, size, seed=seed, augment=augment)
    plan = (lambda e: train_plan(n, batch, seed, e)) if augment else (lambda e: eval_plan(n, batch))
    loader = LoaderBatches(dataset, plan, torch.device("cpu"))
    on_device = DeviceBatches(decode_dataset(dataset).to(device), plan, AugmentConfig() if augment else None, seed)
    return loader, on_device


def mismatch(a, b):
    diff = (a.double() - b.double().to(a.device)).abs()
    where = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
    return f"max |Δ| {float(diff.max()):.3g} at {where}"


def compare_epochs(loader, on_device, epoch, image_atol):
    a_batches, b_batches = list(loader.epoch(epoch)), list(on_device.epoch(epoch))
    assert len(a_batches) == len(b_batches) == len(loader.epoch(epoch))
    for (a_img, a_mask), (b_img, b_mask) in zip(a_batches, b_batches):
        assert a_img.shape == b_img.shape and a_img.dtype == b_img.dtype == torch.float32
        assert a_mask.dtype == b_mask.dtype == torch.int64
        assert torch.allclose(a_img, b_img.cpu(), atol=image_atol, rtol=0), mismatch(a_img, b_img)
        wrong = (a_mask != b_mask.cpu()).double().mean().item()
        assert wrong == 0, f"{wrong:.2%} of mask pixels differ; {mismatch(a_mask, b_mask)}"


@pytest.mark.parametrize("epoch", [0, 3])
def test_device_pipeline_on_cpu_gives_the_loader_batches(epoch):
    loader, on_device = pipelines(torch.device("cpu"))
    compare_epochs(loader, on_device, epoch, image_atol=1e-5)


def test_device_pipeline_without_augmentation_gives_the_eval_batches():
    loader, on_device = pipelines(torch.device("cpu"), augment=False)
    compare_epochs(loader, on_device, 0, image_atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_device_pipeline_in_a_16bit_dtype_rounds_its_float32_batches_once(dtype):
    """Training batches for autocast: the float32 batch rounded once to `dtype` (what the first
    convolution's autocast cast made of it inside the step), bit for bit; the masks unchanged."""
    dataset = SyntheticFaces(10, 32, seed=7, augment=True)
    cache, plan = decode_dataset(dataset), (lambda e: train_plan(10, 4, 7, e))
    wide = DeviceBatches(cache, plan, AugmentConfig(), 7)
    narrow = DeviceBatches(cache, plan, AugmentConfig(), 7, image_dtype=dtype)
    for (a_img, a_mask), (b_img, b_mask) in zip(wide.epoch(2), narrow.epoch(2)):
        assert b_img.dtype == dtype and b_img.shape == a_img.shape
        differ = (b_img != a_img.to(dtype)).sum().item()
        assert differ == 0, f"{differ} of {b_img.numel()} values are not the float32 batch rounded to {dtype}"
        assert torch.equal(a_mask, b_mask)


def test_augmentation_really_varies_per_sample_and_epoch():
    _, on_device = pipelines(torch.device("cpu"), n=8, batch=8)
    (e0, m0), = list(on_device.epoch(0))
    (e1, m1), = list(on_device.epoch(1))
    _, plain = pipelines(torch.device("cpu"), n=8, batch=8, augment=False)
    (p0, _), = list(plain.epoch(0))
    assert not torch.allclose(e0, p0[train_plan(8, 8, 7, 0)[0]])
    assert not torch.equal(m0, m1)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("epoch", [0, 5])
def test_device_pipeline_on_cuda_matches_the_cpu_loader(epoch):
    # The same parameters warp on the GPU and on the CPU: bilinear images agree to float rounding,
    # masks exactly (their sample points are float64, see msf.data.augment_batch).
    loader, on_device = pipelines(torch.device("cuda"), n=12, size=64, batch=4)
    compare_epochs(loader, on_device, epoch, image_atol=1e-4)


@cuda_only
def test_augment_batch_on_cuda_matches_cpu_for_the_same_parameters():
    dataset = SyntheticFaces(6, 96, seed=2)
    cache = decode_dataset(dataset)
    images, masks = cache.images.float().div(255), cache.masks.long()
    params = sample_params_for(1, 0, range(6))
    cpu_img, cpu_mask = augment_batch(images, masks, params)
    gpu_img, gpu_mask = augment_batch(images.cuda(), masks.cuda(), params)
    assert torch.allclose(cpu_img, gpu_img.cpu(), atol=1e-4), mismatch(cpu_img, gpu_img)
    assert torch.equal(cpu_mask, gpu_mask.cpu()), mismatch(cpu_mask, gpu_mask)


def test_a_cache_too_large_for_the_gpu_is_refused_with_the_alternative(monkeypatch):
    from msf.train.inputs import check_fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    check_fits(int(1.9 * 2**30), torch.device("cuda"))  # under half the free memory: fine
    with pytest.raises(ValueError, match="needs 2.5 GiB.*--pipeline loader"):
        check_fits(int(2.5 * 2**30), torch.device("cuda"))
    check_fits(10**12, torch.device("cpu"))  # the CPU keeps its cache in host memory


def test_original_layout_caches_and_its_key_follows_the_part_masks(tmp_path):
    (tmp_path / "CelebA-HQ-img").mkdir()
    anno = tmp_path / "CelebAMask-HQ-mask-anno" / "0"
    anno.mkdir(parents=True)
    for n in (3, 4):
        Image.fromarray(np.full((32, 32, 3), 40 * n, np.uint8)).save(tmp_path / "CelebA-HQ-img" / f"{n}.jpg")
        layer = np.zeros((16, 16), np.uint8)
        layer[: 4 * n] = 255
        Image.fromarray(layer).save(anno / f"{n:05d}_skin.png")
    dataset = CelebAMaskHQDataset(tmp_path)
    cache = load_uint8_cache(dataset, tmp_path / "cache")
    assert cache.images.shape == (2, 3, 16, 16) and cache.masks.shape == (2, 16, 16)
    assert [int((m == 1).sum()) for m in cache.masks] == [12 * 16, 16 * 16]
    key = cache_key(dataset)
    part = anno / "00004_skin.png"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    assert cache_key(CelebAMaskHQDataset(tmp_path)) != key
