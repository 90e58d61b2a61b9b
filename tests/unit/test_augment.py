from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c3ae_ray.augment import AugmentConfig, _sample, affine_theta, crop_batch, jitter_boxes
from c3ae_ray.config import to_dict
from c3ae_ray.crops import CropConfig, cut_region
from tests.oracles import sample_crops

R = CropConfig().region_size  # 154
OFF = AugmentConfig(
    shift=0.0, p_rotate=0.0, p_flip=0.0, p_brightness=0.0, p_contrast=0.0, p_temperature=0.0, p_erase=0.0
)


def realistic_regions(n, size=R, seed=0) -> np.ndarray:
    """Smooth random images plus pixel noise: (n, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 255, (n, 3, size // 10, size // 10)).astype(np.float32))
    smooth = F.interpolate(small, size=(size, size), mode="bicubic").permute(0, 2, 3, 1).numpy()
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def default_boxes(n) -> torch.Tensor:
    """The stored context boxes of a face centred in the region (as cut_region makes them), for n faces."""
    _, boxes = cut_region(np.zeros((200, 200, 3), np.uint8), [68, 68, 132, 132])
    return torch.from_numpy(boxes).expand(n, -1, -1).clone()


def only(**changes) -> AugmentConfig:
    return replace(OFF, **changes)


def unaugmented(regions, boxes) -> torch.Tensor:
    """The crops the augmented path gives with everything off (grid_sample's, as augmented crops are cut): what
    one augmentation is compared against."""
    return crop_batch(regions, boxes, augment=OFF, generator=torch.Generator())


def test_unaugmented_equals_sample_crops():
    regions = realistic_regions(4)
    boxes = torch.tensor(
        [
            [[13.3, 20.7, 77.3, 84.7], [0.0, 0.0, 154.0, 154.0], [40.25, 30.5, 112.75, 103.0]],
            [[-30.0, -12.5, 60.0, 77.5], [100.0, 90.0, 190.0, 180.0], [-200.0, -180.0, 350.0, 370.0]],  # reflected
            [[50.0, 50.0, 54.0, 54.0], [10.0, 60.0, 30.0, 100.0], [0.5, 0.5, 153.5, 153.5]],  # enlarge, non-square
            [[-5.1, 140.2, 40.9, 190.6], [70.0, -9.0, 160.0, 81.0], [33.3, 33.3, 97.7, 97.7]],
        ]
    )
    batched = crop_batch(torch.from_numpy(regions), boxes)
    assert batched.shape == (4, 3, 3, 64, 64) and batched.dtype == torch.float32
    for region, face_boxes, crops in zip(regions, boxes.numpy(), batched):
        expected = sample_crops(region, face_boxes).transpose(0, 3, 1, 2).astype(np.int64)
        assert np.abs(crops.round().numpy().astype(np.int64) - expected).max() <= 1


def test_unaugmented_equals_sample_crops_on_cut_regions():
    image = realistic_regions(1, size=300, seed=3)[0][:, :260]
    faces = [[100, 80, 180, 190], [-10, 5, 60, 70], [230, 250, 270, 299]]  # inside, top-left corner, bottom-right
    regions, boxes = zip(*(cut_region(image, face) for face in faces))
    batched = crop_batch(torch.from_numpy(np.stack(regions)), torch.from_numpy(np.stack(boxes)))
    for region, face_boxes, crops in zip(regions, boxes, batched):
        expected = sample_crops(region, face_boxes).transpose(0, 3, 1, 2).astype(np.int64)
        assert np.abs(crops.round().numpy().astype(np.int64) - expected).max() <= 1


def test_everything_off_equals_no_augmentation():
    regions, boxes = torch.from_numpy(realistic_regions(3)), default_boxes(3)
    generator = torch.Generator().manual_seed(0)
    augmented = crop_batch(regions, boxes, augment=OFF, generator=generator)
    assert torch.equal(augmented, _sample(regions, affine_theta(boxes, R), 64))  # nothing drawn changes a crop
    # the inference crops on CPUs come from `_unturned_crops`: the same sampling, equal within float rounding
    torch.testing.assert_close(crop_batch(regions, boxes), augmented, rtol=0, atol=0.01)


def test_unturned_crops_equal_grid_samples_anywhere():
    """The CPU inference crops against grid_sample's: boxes inside, across the edges and many widths out
    (reflected several times), shrinking and enlarging, non-square, at fractional positions."""
    rng = np.random.default_rng(5)
    regions = torch.from_numpy(realistic_regions(40, seed=5))
    corners = rng.uniform(-300, 300, (40, 3, 2)).astype(np.float32)
    boxes = torch.from_numpy(np.concatenate([corners, corners + rng.uniform(1, 500, (40, 3, 2)).astype(np.float32)], 2))
    expected = _sample(regions, affine_theta(boxes, R), 64)
    unturned = crop_batch(regions, boxes)
    assert unturned.shape == expected.shape and unturned.dtype == torch.float32
    difference = (unturned - expected).abs()
    assert difference.max() < 0.05 and difference.mean() < 1e-3  # float32 rounding of far-out coordinates


def test_flip_mirrors_every_crop():
    regions, boxes = torch.from_numpy(realistic_regions(3)), default_boxes(3)
    boxes[1] += 7.3  # fractional positions sample mirrored pixels exactly too
    flipped = crop_batch(regions, boxes, augment=only(p_flip=1.0), generator=torch.Generator().manual_seed(0))
    plain = unaugmented(regions, boxes)
    assert not torch.allclose(flipped, plain)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-3, rtol=0)


def test_jitter_stays_inside_the_region_and_moves_boxes_independently():
    boxes = default_boxes(500)
    side = boxes[..., 2:] - boxes[..., :2]
    moved = jitter_boxes(boxes, R, 0.1, torch.Generator().manual_seed(0))
    share = (moved[..., :2] - boxes[..., :2]) / side
    assert (share.abs() <= 0.1 + 1e-6).all() and (share.abs() > 0.09).any()  # uses its whole range
    assert (share[:, 0] - share[:, 1]).abs().max() > 0.05 and (share[..., 0] - share[..., 1]).abs().max() > 0.05
    wide = jitter_boxes(boxes, R, 0.3, torch.Generator().manual_seed(0))  # past the 10% margin: stops at it
    assert torch.allclose(wide[..., 2:] - wide[..., :2], side)  # moved, not resized
    assert (wide >= 0).all() and (wide <= R).all()
    assert (wide[:, 2, :2] == 0).any() and (wide[:, 2, 2:] == R).any()
    assert ((wide[:, 0, :2] - boxes[:, 0, :2]).abs() > 0.2 * side[:, 0]).any()  # small boxes still move far


def test_jitter_never_moves_a_box_further_out():
    boxes = torch.tensor([[[-20.0, 10.0, 60.0, 90.0], [100.0, 130.0, 170.0, 200.0], [-10.0, -10.0, 170.0, 170.0]]])
    moved = jitter_boxes(boxes.expand(300, -1, -1), R, 0.5, torch.Generator().manual_seed(1))
    assert (moved[:, 0, 0] >= -20).all() and (moved[:, 0, 1] >= 0).all() and (moved[:, 0, 3] <= R).all()
    assert (moved[:, 1, 2] <= 170).all() and (moved[:, 1, 3] <= 200).all() and (moved[:, 1, 0] >= 0).all()
    assert torch.equal(moved[:, 2], boxes[:, 2].expand(300, -1))  # beyond both sides: stays put


def test_shift_changes_the_crops():
    regions, boxes = torch.from_numpy(realistic_regions(2)), default_boxes(2)
    shifted = crop_batch(regions, boxes, augment=only(shift=0.1), generator=torch.Generator().manual_seed(0))
    assert ((shifted - crop_batch(regions, boxes)).abs().amax(dim=(2, 3, 4)) > 1).all()


def test_theta_at_90_degrees_rotates_the_crop():
    regions = torch.from_numpy(realistic_regions(2))
    boxes = torch.tensor([[[40.0, 30.0, 104.0, 94.0], [20.0, 20.0, 132.0, 132.0]]]).expand(2, -1, -1)
    theta = affine_theta(boxes, R, torch.tensor([90.0, -90.0]), torch.tensor([False, True]))
    grid = F.affine_grid(theta.flatten(0, 1), [4, 3, 64, 64], align_corners=False)
    pixels = regions.permute(0, 3, 1, 2).float().repeat_interleave(2, dim=0)
    turned = F.grid_sample(pixels, grid, padding_mode="reflection", align_corners=False).view(2, 2, 3, 64, 64)
    plain = crop_batch(regions, boxes)
    torch.testing.assert_close(turned[0], plain[0].rot90(1, dims=(-2, -1)), atol=1e-2, rtol=0)
    torch.testing.assert_close(turned[1], plain[1].rot90(-1, dims=(-2, -1)).flip(-1), atol=1e-2, rtol=0)


def test_rotation_turns_all_crops_of_a_face_by_the_same_angle():
    ys, xs = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    rings = ((xs - R / 2) ** 2 + (ys - R / 2) ** 2).sqrt()  # rotation-invariant about the region's centre...
    stripes = (xs * 255 / R).to(torch.uint8)  # ...and not
    regions = torch.stack([rings.to(torch.uint8), stripes, stripes], dim=-1)[None].expand(8, -1, -1, -1)
    boxes = default_boxes(8)
    cfg = only(p_rotate=1.0, max_degrees=30.0)
    turned = crop_batch(regions, boxes, augment=cfg, generator=torch.Generator().manual_seed(0))
    plain = crop_batch(regions, boxes)
    disk = ((xs[:64, :64] - 31.5) ** 2 + (ys[:64, :64] - 31.5) ** 2) < 30**2  # stays inside the region
    torch.testing.assert_close(turned[:, :, 0, disk], plain[:, :, 0, disk], atol=2.0, rtol=0)  # rings stay
    row_slope = (turned[:, :, 1, 32, 48] - turned[:, :, 1, 32, 16]) / (plain[:, :, 1, 32, 48] - plain[:, :, 1, 32, 16])
    col_slope = (turned[:, :, 1, 48, 32] - turned[:, :, 1, 16, 32]) / (plain[:, :, 1, 32, 48] - plain[:, :, 1, 32, 16])
    angles = torch.atan2(col_slope, row_slope)  # the stripes' gradient turns by the angle, same for each box
    assert (angles.std(dim=1) < 0.02).all() and angles[:, 0].abs().max() > 0.1
    assert angles.abs().max() <= np.deg2rad(30) + 0.02


def test_colour_stays_in_range_and_is_shared_by_a_face():
    flat = torch.full((6, R, R, 3), 100, dtype=torch.uint8)
    boxes = default_boxes(6)
    generator = torch.Generator().manual_seed(0)
    brighter = crop_batch(flat, boxes, augment=only(p_brightness=1.0), generator=generator) - 100
    assert torch.allclose(brighter, brighter[:, :1, :1, :1, :1].expand_as(brighter), atol=1e-4)  # one per face
    offsets = brighter[:, 0, 0, 0, 0]
    assert offsets.abs().max() <= 0.2 * 255 + 1e-3 and offsets.std() > 5

    warmer = crop_batch(flat, boxes, augment=only(p_temperature=1.0), generator=generator) / 100
    t = warmer[:, :1, :1, :1, :1] - 1
    assert torch.allclose(warmer[:, :, 0], (1 + t)[:, :, 0].expand_as(warmer[:, :, 0]), atol=1e-5)
    assert torch.allclose(warmer[:, :, 1], torch.ones_like(warmer[:, :, 1]))
    assert torch.allclose(warmer[:, :, 2], (1 - t)[:, :, 0].expand_as(warmer[:, :, 2]), atol=1e-5)
    assert t.abs().max() <= 0.1 + 1e-6 and t.abs().max() > 0.01

    mid = torch.from_numpy(realistic_regions(6) // 2 + 64)  # 64..191: contrast never clips
    plain = crop_batch(mid, boxes)
    contrasted = crop_batch(mid, boxes, augment=only(p_contrast=1.0), generator=generator)
    centred = contrasted - contrasted.mean(dim=(2, 3, 4), keepdim=True)
    factor = centred.flatten(2).norm(dim=2) / (plain - plain.mean(dim=(2, 3, 4), keepdim=True)).flatten(2).norm(dim=2)
    assert (factor.std(dim=1) < 1e-4).all() and ((factor - 1).abs() <= 0.2 + 1e-4).all() and factor.std() > 0.02
    torch.testing.assert_close(contrasted.mean(dim=(2, 3, 4)), plain.mean(dim=(2, 3, 4)))

    extremes = torch.from_numpy(np.where(realistic_regions(6) > 127, 250, 5).astype(np.uint8))
    strong = only(p_brightness=1.0, brightness=0.5, p_contrast=1.0, contrast=0.9, p_temperature=1.0, temperature=0.5)
    crops = crop_batch(extremes, boxes, augment=strong, generator=generator)
    assert crops.min() == 0 and crops.max() == 255


def test_erasing_fills_one_rectangle_per_crop():
    regions, boxes = torch.from_numpy(realistic_regions(20)), default_boxes(20)
    plain = unaugmented(regions, boxes)
    assert torch.equal(crop_batch(regions, boxes, augment=only(p_erase=0.0), generator=torch.Generator()), plain)
    erased = crop_batch(regions, boxes, augment=only(p_erase=1.0), generator=torch.Generator().manual_seed(0))
    changed = (erased != plain).any(dim=2)  # (N, S, 64, 64)
    share = changed.float().mean(dim=(2, 3))
    assert (share >= 0.02 * 0.8).all() and (share <= 0.2 * 1.2).all() and share.std() > 0.02
    rows, cols = changed.any(dim=3).sum(dim=2), changed.any(dim=2).sum(dim=2)
    assert torch.equal(rows * cols, changed.sum(dim=(2, 3)))  # a filled rectangle
    assert (erased >= 0).all() and (erased <= 255).all()
    assert not torch.equal(changed[:, 0], changed[:, 1])  # drawn per crop
    halves = only(p_erase=0.5)
    some = crop_batch(regions, boxes, augment=halves, generator=torch.Generator().manual_seed(0))
    hit = (some != plain).flatten(2).any(dim=2)  # (N, S)
    assert (hit.any(dim=1) & ~hit.all(dim=1)).any()  # decided per crop


def test_seeded_runs_repeat_and_single_faces_work():
    regions, boxes = torch.from_numpy(realistic_regions(3)), default_boxes(3)
    cfg = AugmentConfig(p_rotate=1.0, p_flip=0.5, p_brightness=1.0, p_contrast=1.0, p_temperature=1.0, p_erase=1.0)
    first = crop_batch(regions, boxes, augment=cfg, generator=torch.Generator().manual_seed(5))
    again = crop_batch(regions, boxes, augment=cfg, generator=torch.Generator().manual_seed(5))
    other = crop_batch(regions, boxes, augment=cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    single = crop_batch(regions[:1], boxes[:1], augment=AugmentConfig())
    assert single.shape == (1, 3, 3, 64, 64) and single.dtype == torch.float32
    assert to_dict(AugmentConfig())["erase_area"] == [0.02, 0.2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    regions, boxes = torch.from_numpy(realistic_regions(3)).cuda(), default_boxes(3).cuda()
    expected = crop_batch(regions.cpu(), boxes.cpu())
    torch.testing.assert_close(crop_batch(regions, boxes).cpu(), expected, atol=1e-2, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    crops = crop_batch(regions, boxes, augment=AugmentConfig(), generator=generator)
    assert crops.device.type == "cuda" and crops.shape == (3, 3, 3, 64, 64)


@pytest.mark.parametrize(
    "regions, boxes",
    [
        (torch.zeros(2, R, R, dtype=torch.uint8), torch.zeros(2, 3, 4)),  # no channel axis
        (torch.zeros(2, R, R + 1, 3, dtype=torch.uint8), torch.zeros(2, 3, 4)),  # not square
        (torch.zeros(2, 3, R, R, dtype=torch.uint8), torch.zeros(2, 3, 4)),  # channels first
        (torch.zeros(2, R, R, 3), torch.zeros(2, 3, 4)),  # float pixels
        (torch.zeros(2, R, R, 3, dtype=torch.uint8), torch.zeros(3, 3, 4)),  # other batch size
        (torch.zeros(2, R, R, 3, dtype=torch.uint8), torch.zeros(2, 3, 2)),  # not x1, y1, x2, y2
        (torch.zeros(2, R, R, 3, dtype=torch.uint8), torch.zeros(2, 4)),  # no box axis
    ],
)
def test_bad_shapes_are_rejected(regions, boxes):
    with pytest.raises(ValueError):
        crop_batch(regions, boxes)
