import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c3ae_ray.config import UserError, build, to_dict
from c3ae_ray.crops import CropConfig, context_boxes, cut_region, eye_angle, reflected_square, region_bounds, shrunk_square
from c3ae_ray.images import decode_image
from tests.oracles import face_crops, sample_crops


def gradient_image(height=256, width=256) -> np.ndarray:
    """Red = x, green = y: every pixel says where it is, and bilinear sampling of it is exact."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def smooth_image(seed=0, size=120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float32)
    return np.clip(
        F.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(size, size), mode="bicubic")[0]
        .permute(1, 2, 0)
        .numpy(),
        0,
        255,
    ).astype(np.uint8)


def test_default_geometry():
    cfg = CropConfig()
    assert cfg.scales == (1.0, 1.5, 2.0) and cfg.size == 64
    assert cfg.region_size == 154  # 64 px face, 2x context, 10% margin each side
    assert build(CropConfig, to_dict(cfg)) == cfg


def test_a_geometry_the_model_cannot_take_is_refused_where_it_is_set():
    """The crop side is the network's input and the network has three contexts: nothing else gets through."""
    with pytest.raises(UserError, match="crop size is fixed at 64"):
        build(CropConfig, {"size": 96})
    with pytest.raises(UserError, match="3 increasing positive numbers"):
        build(CropConfig, {"scales": [1.0, 2.0]})
    with pytest.raises(UserError, match="3 increasing positive numbers"):
        CropConfig(scales=(1.0, 2.0, 1.5))
    assert CropConfig(scales=(1.0, 1.7, 2.5), margin=0.2).region_size == 224  # 64 x 2.5 x (1 + 2 x 0.2)


def test_context_boxes_are_squares_on_the_longer_side():
    boxes = context_boxes([10, 10, 50, 90])  # 40 wide, 80 high, centre (30, 50)
    np.testing.assert_allclose(boxes, [[-10, 10, 70, 90], [-30, -10, 90, 110], [-50, -30, 110, 130]])


def test_crops_have_exact_expected_pixels():
    image = gradient_image()
    crops = face_crops(image, [96, 96, 160, 160])
    assert crops.shape == (3, 64, 64, 3) and crops.dtype == np.uint8
    j = np.arange(64)
    for scale, crop in zip((1.0, 1.5, 2.0), crops):
        side = 64 * scale
        start = 128 - side / 2
        # pixel centres of the box, in the image's pixel-centre coordinates; the image is linear, so exact
        expected = np.floor(start + (j + 0.5) * side / 64 - 0.5 + 0.5)
        np.testing.assert_array_equal(crop[0, :, 0], expected)  # red follows x along a row
        np.testing.assert_array_equal(crop[:, 0, 1], expected)  # green follows y down a column
        assert (crop[:, :, 2] == 0).all()
    np.testing.assert_array_equal(crops[0, 5, 7], [96 + 7, 96 + 5, 0])  # scale 1: pixels copied 1:1


def test_region_mirrors_the_image_at_the_border():
    image = gradient_image()
    region, boxes = cut_region(image, [0, 100, 64, 164])  # side 154 == region size: no resampling
    assert region_bounds([0, 100, 64, 164]) == (-45, 55, 154)
    np.testing.assert_array_equal(region[0, :46, 0], np.r_[np.arange(44, -1, -1), 0])  # ...2 1 0 | 0 1...
    np.testing.assert_array_equal(region[0, 45:60, 0], np.arange(0, 15))
    np.testing.assert_allclose(boxes[0], [45, 45, 109, 109])


@pytest.mark.parametrize(
    "box",
    [
        [-20, 30, 25, 80],  # left
        [90, 30, 130, 80],  # right
        [40, -30, 80, 15],  # top
        [40, 95, 80, 140],  # bottom
        [-50, -50, 170, 170],  # all four, and far past them
    ],
)
def test_reflect_padding_at_every_border(box):
    image = smooth_image(seed=1)[:110, :120]
    pad = 400
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    shifted = np.asarray(box) + pad
    np.testing.assert_array_equal(face_crops(image, box), face_crops(padded, shifted))


def test_reflected_squares_equal_numpys_symmetric_padding_anywhere():
    rng = np.random.default_rng(0)
    for _ in range(300):  # images down to 1 px, squares inside, across edges, wholly outside, several widths out
        height, width = rng.integers(1, 50, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        side, x1, y1 = int(rng.integers(1, 200)), int(rng.integers(-150, 80)), int(rng.integers(-150, 80))
        pad = 400
        expected = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")[y1 + pad:y1 + pad + side, x1 + pad:x1 + pad + side]
        np.testing.assert_array_equal(reflected_square(image, x1, y1, side), expected)


def test_shrunk_squares_equal_opencvs_area_filter_on_the_reflected_square_within_rounding(shared_data):
    rng = np.random.default_rng(4)
    faces = [decode_image(path.read_bytes()) for path in sorted((shared_data / "utkface").glob("*.jpg"))[:5]]
    cases = [(faces[0], -213, -213, 626, 154), (faces[1], 0, 0, 200, 154), (faces[2], 0, 0, 308, 154),  # integer scale
             (faces[3], -5000, 300, 1540, 154), (faces[4], 23, 17, 155, 154)]
    for _ in range(200):  # images down to 1 px, squares inside, across edges, wholly outside, several widths out
        height, width = rng.integers(1, 60, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        side, size = int(rng.integers(2, 400)), int(rng.integers(1, 160))
        cases.append((image, int(rng.integers(-400, 80)), int(rng.integers(-400, 80)), max(side, size + 1), size))
    differing = pixels = 0
    for image, x1, y1, side, size in cases:
        expected = cv2.resize(reflected_square(image, x1, y1, side), (size, size), interpolation=cv2.INTER_AREA)
        difference = np.abs(shrunk_square(image, x1, y1, side, size).astype(int) - expected)
        assert difference.max() <= 1, (image.shape, x1, y1, side, size)
        differing, pixels = differing + np.count_nonzero(difference), pixels + difference.size
    assert differing / pixels < 0.01


def test_tiny_and_non_square_boxes():
    image = smooth_image(seed=2)
    for box in ([50, 50, 51, 51], [50.2, 50.2, 50.5, 50.9], [10, 10, 12, 90], [0, 0, 119, 3]):
        crops = face_crops(image, box)
        assert crops.shape == (3, 64, 64, 3)


@pytest.mark.parametrize("box", [[10, 10, 10, 20], [10, 10, 5, 20], [0, 0, np.nan, 5], [1, 2, 3]])
def test_invalid_boxes_are_rejected(box):
    with pytest.raises(ValueError, match="face box"):
        face_crops(smooth_image(), box)


def test_gray_rgba_and_16_bit_inputs_are_converted():
    rgb = smooth_image(seed=3)
    gray = rgb[:, :, 1]
    box = [30, 30, 80, 90]
    np.testing.assert_array_equal(face_crops(gray, box), face_crops(np.dstack([gray] * 3), box))
    np.testing.assert_array_equal(face_crops(gray[:, :, None], box), face_crops(np.dstack([gray] * 3), box))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(face_crops(rgba, box), face_crops(rgb, box))
    sixteen = rgb.astype(np.uint16) * 257
    np.testing.assert_array_equal(face_crops(sixteen, box), face_crops(rgb, box))


@pytest.mark.parametrize("bad", [np.zeros((10, 10, 2), np.uint8), np.zeros((0, 5, 3), np.uint8), np.zeros(5, np.uint8)])
def test_unusable_arrays_are_rejected(bad):
    with pytest.raises(ValueError, match="expected an image"):
        face_crops(bad, [0, 0, 2, 2])


def test_geometry_does_not_depend_on_image_resolution():
    """A face photographed 8x larger gives nearly the same crops (area filter when shrinking)."""
    small = smooth_image(seed=4)
    large = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(2, 0, 1)[None].float(), scale_factor=8, mode="nearest"
    )[0].permute(1, 2, 0).numpy(), dtype=np.uint8)
    box = np.array([40, 35, 80, 85])
    difference = np.abs(face_crops(small, box).astype(int) - face_crops(large, box * 8).astype(int))
    assert difference.mean() < 3, difference.mean()


def test_sample_crops_equals_grid_sample():
    """The contract with training's batched augmentation: bilinear, reflection, align_corners=False."""
    rng = np.random.default_rng(5)
    region = rng.integers(0, 256, (154, 154, 3)).astype(np.uint8)
    boxes = np.array([[45, 45, 109, 109], [-30, 10, 100, 140], [100.3, -20.7, 190.1, 69.1]], np.float32)
    crops = sample_crops(region, boxes)
    size, n = 64, region.shape[0]
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    grids = []
    for x1, y1, x2, y2 in boxes.astype(np.float64):
        xs = x1 + centres * (x2 - x1) - 0.5
        ys = y1 + centres * (y2 - y1) - 0.5
        gx, gy = (2 * xs + 1) / n - 1, (2 * ys + 1) / n - 1
        grids.append(torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1))
    image = torch.from_numpy(region).permute(2, 0, 1)[None].double().expand(len(boxes), -1, -1, -1)
    sampled = F.grid_sample(image, torch.stack(grids), mode="bilinear", padding_mode="reflection", align_corners=False)
    difference = np.abs(sampled.permute(0, 2, 3, 1).numpy() - crops.astype(np.float64))
    assert difference.max() <= 0.5 + 1e-6  # rounding to uint8 only


def rotated(image: np.ndarray, degrees: float, centre) -> tuple[np.ndarray, np.ndarray]:
    """The image turned by `degrees` (counter-clockwise on screen) about `centre`, and the affine matrix."""
    matrix = cv2.getRotationMatrix2D(tuple(map(float, centre)), degrees, 1.0)
    return cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), matrix


def test_aligned_regions_level_the_eyes_and_undo_a_rotation():
    image = smooth_image(seed=3, size=240)
    box, eyes = [80, 80, 160, 160], np.array([[100.0, 110.0], [140.0, 110.0], [120, 130], [105, 145], [135, 145]])
    aligned = CropConfig(align=True)
    upright, upright_boxes = cut_region(image, box, aligned, eyes)
    plain, plain_boxes = cut_region(image, box, CropConfig())
    # level eyes: the aligned region is the plain one (up to whole-pixel rounding of the plain bounds)
    np.testing.assert_allclose(upright_boxes, plain_boxes, atol=1.0)
    assert np.abs(upright.astype(int) - plain).mean() < 3
    turned, matrix = rotated(image, -20, (120, 120))  # the face turned 20 degrees clockwise about the box centre
    turned_eyes = np.hstack([eyes, np.ones((5, 1))]) @ matrix.T
    assert CropConfig().align is False and abs(eye_angle(turned_eyes) - 20) < 1e-6
    back, back_boxes = cut_region(turned, box, aligned, turned_eyes)
    np.testing.assert_allclose(back_boxes, upright_boxes)
    inner = (slice(20, -20), slice(20, -20))  # away from the reflected borders
    assert np.abs(back[inner].astype(int) - upright[inner]).mean() < 3  # the rotation undone
    unaligned, _ = cut_region(turned, box, CropConfig())
    assert np.abs(unaligned[inner].astype(int) - upright[inner]).mean() > 10
    with pytest.raises(ValueError, match="need the face's landmarks"):
        cut_region(image, box, aligned)


def test_a_real_face_photo_turned_20_degrees_gives_nearly_the_upright_crops_when_aligned(shared_data):
    """MTCNN on a portrait upright and turned by 20 degrees: with alignment the model's three crops nearly agree
    (what is left is the detector's own jitter in box and landmarks), without it they do not."""
    from c3ae_ray.detect import FaceDetector

    photo = cv2.cvtColor(cv2.imread(str(shared_data / "faces" / "shea_whigham.jpg")), cv2.COLOR_BGR2RGB)
    detector = FaceDetector(device="cpu")

    def main_face(image):
        [faces] = detector.detect([image])
        largest = int(np.argmax(faces.boxes[:, 2] - faces.boxes[:, 0]))
        return faces.boxes[largest], faces.landmarks[largest]

    upright = main_face(photo)
    turned_photo, _ = rotated(photo, 20, upright[0].reshape(2, 2).mean(0))
    turned = main_face(turned_photo)
    assert abs(eye_angle(turned[1]) - eye_angle(upright[1]) + 20) < 5  # the detector sees the turn
    difference = {}
    for align in (True, False):
        cfg = CropConfig(align=align)
        crops = [face_crops(image, box, cfg, points).astype(int) for image, (box, points) in ((photo, upright), (turned_photo, turned))]
        difference[align] = np.abs(crops[0] - crops[1]).mean()
    assert difference[True] < 0.5 * difference[False] and difference[True] < 20, difference  # here 14 against 35


def test_a_model_file_trained_on_aligned_crops_aligns_wherever_it_runs(shared_data, tmp_path):
    """The crop geometry travels in the model file: the one finder that predict, score and serve use cuts
    aligned regions for a model trained on aligned ones, and unaligned regions for the bundled model."""
    from c3ae_ray.inference import Estimator
    from c3ae_ray.model import BUNDLED_MODEL, load_model, save_model

    model, payload = load_model(BUNDLED_MODEL)
    save_model(model, tmp_path / "aligned.pt", crop_config=to_dict(CropConfig(align=True)), meta=payload["meta"])
    photo = cv2.cvtColor(cv2.imread(str(shared_data / "faces" / "shea_whigham.jpg")), cv2.COLOR_BGR2RGB)
    turned, _ = rotated(photo, 20, (photo.shape[1] / 2, photo.shape[0] / 2))
    regions = {}
    for name, source in (("aligned", tmp_path / "aligned.pt"), ("bundled", BUNDLED_MODEL)):
        estimator = Estimator(source, device="cpu", max_faces=1)
        [found] = estimator.finder.find([turned], max_faces=1)
        box, points = found.faces.boxes[0], found.faces.landmarks[0]
        assert estimator.age_model.crop.align == (name == "aligned")
        expected, _ = cut_region(turned, box, CropConfig(align=name == "aligned"), points)
        np.testing.assert_array_equal(found.regions[0], expected)
        regions[name] = found.regions[0].astype(int)
    assert np.abs(regions["aligned"] - regions["bundled"]).mean() > 10  # the turn is undone in one of them only
