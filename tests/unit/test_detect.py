"""The MTCNN wrapper on real photos: the detection check, mixed-size batches, boxes mapped back exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from c3ae_ray.detect import (
    DetectorConfig,
    FaceDetector,
    Networks,
    _box_crops,
    _detect_batch,
    _nms,
    _nms_min,
    _summed_area_table,
    area_resampled,
    whole_images_resampled,
    detection_scale,
)
from c3ae_ray.images import decode_image


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector("cpu")


@pytest.fixture(scope="module")
def photos(shared_data) -> dict[str, np.ndarray]:
    names = ("multiface.jpg", "ivan.jpg", "no-faces.jpg")
    return {name: decode_image((shared_data / "faces" / name).read_bytes()) for name in names}


def test_detection_check_on_the_shared_photos(detector, photos):
    found = dict(zip(photos, detector.detect(list(photos.values()))))
    assert len(found["multiface.jpg"].above(0.9)) >= 5
    assert len(found["ivan.jpg"].above(0.9)) == 1
    assert len(found["no-faces.jpg"]) == 0
    ivan = found["ivan.jpg"]
    assert ivan.boxes.shape == (1, 4) and ivan.landmarks.shape == (1, 5, 2)
    x1, y1, x2, y2 = ivan.boxes[0]
    assert 40 < x2 - x1 < 70 and 50 < y2 - y1 < 80
    # landmarks sit inside the face box: eyes above the mouth corners
    points = ivan.landmarks[0]
    assert np.all((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2))
    assert points[0, 1] < points[3, 1] and points[1, 1] < points[4, 1]
    scores = found["multiface.jpg"].scores
    assert np.all(np.diff(scores) <= 0), "faces come most confident first"


def test_mixed_size_batch_equals_one_image_at_a_time(detector, photos):
    images = list(photos.values()) + [photos["ivan.jpg"][:400, :300]]
    batched = detector.detect(images)
    for image, together in zip(images, batched):
        alone = detector.detect([image])[0]
        assert len(alone) == len(together)
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-3)


def test_equal_size_images_in_one_batch_find_the_faces_they_find_alone(detector, shared_data):
    # R-Net's and O-Net's answers differ in the last bit with the batch's make-up (1e-7), and on faces that fill
    # the image many candidates score 0.9999999: NMS may then keep a neighbour of the box found alone. Same
    # faces, same scores, boxes that overlap; not always the same to the bit.
    from torchvision.ops import box_iou
    import torch

    paths = sorted((shared_data / "utkface").glob("*.jpg"))[:12]
    images = []  # each face 20 px further on a 440 x 440 canvas: an answer given to the wrong image cannot pass
    for k, path in enumerate(paths):
        canvas = np.full((440, 440, 3), 128, np.uint8)
        y, x = 20 * k, 220 - 20 * k
        canvas[y:y + 200, x:x + 200] = decode_image(path.read_bytes())
        images.append(canvas)
    batched = detector.detect(images)
    for image, together in zip(images, batched):
        alone = detector.detect([image])[0]
        assert len(alone) == len(together)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)
        overlap = box_iou(torch.as_tensor(alone.boxes), torch.as_tensor(together.boxes)).diagonal()
        assert torch.all(overlap > 0.8), overlap


def test_onnx_runtime_networks_give_stock_facenet_results(detector, photos):
    from facenet_pytorch import MTCNN

    stock = MTCNN(keep_all=True, select_largest=False, device="cpu", min_face_size=detector.cfg.min_face_size)
    boxes, scores, points = stock.detect(photos["multiface.jpg"], landmarks=True)
    ours = detector.detect([photos["multiface.jpg"]])[0]
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    np.testing.assert_allclose(ours.boxes, np.asarray(boxes, np.float64)[order], atol=1e-2)
    np.testing.assert_allclose(ours.landmarks, np.asarray(points, np.float64)[order], atol=1e-2)


def test_pytorch_networks_find_what_onnx_runtime_finds(detector, photos):
    # GPUs run facenet-pytorch's modules (`Networks.pytorch`) between the same numpy glue; here on the CPU
    batch = photos["multiface.jpg"][None]
    onnx = _detect_batch(detector.cfg, detector.networks, batch)[0]
    pytorch = _detect_batch(detector.cfg, Networks.pytorch(detector.mtcnn, "cpu"), batch)[0]
    assert len(onnx[0]) == len(pytorch[0]) >= 5
    for ours, theirs in zip(onnx, pytorch):
        np.testing.assert_allclose(ours, theirs, atol=1e-2)


def test_large_images_are_detected_shrunk_and_mapped_back_exactly(photos):
    small = FaceDetector("cpu", DetectorConfig(max_side=400))
    image = photos["ivan.jpg"]  # 561 x 561 -> detected at 400 x 400
    assert detection_scale(561, 561, 400) == (400, 400)
    shrunk = cv2.resize(image, (400, 400), interpolation=cv2.INTER_AREA)
    direct = small.detect([shrunk])[0]
    mapped = small.detect([image])[0]
    assert len(direct) == len(mapped) >= 1
    np.testing.assert_allclose(mapped.boxes, direct.boxes * (561 / 400), rtol=1e-6)
    np.testing.assert_allclose(mapped.landmarks, direct.landmarks * (561 / 400), rtol=1e-6)
    full = FaceDetector("cpu").detect([image])[0]
    np.testing.assert_allclose(mapped.boxes[0], full.boxes[0], atol=4.0)  # same face, within a few pixels


def test_non_square_scale_maps_each_axis(photos):
    image = cv2.resize(photos["ivan.jpg"], (900, 600), interpolation=cv2.INTER_LINEAR)
    assert detection_scale(600, 900, 450) == (300, 450)
    small = FaceDetector("cpu", DetectorConfig(max_side=450))
    direct = small.detect([cv2.resize(image, (450, 300), interpolation=cv2.INTER_AREA)])[0]
    mapped = small.detect([image])[0]
    np.testing.assert_allclose(mapped.boxes, direct.boxes * np.array([2, 2, 2, 2]), rtol=1e-6)


def test_tiny_images_have_no_faces(detector):
    # 8 px: under P-Net's window; 15 x 3000: a strip under min_face_size (32) even before it is shrunk
    images = [np.zeros((8, 30, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8), np.zeros((15, 3000, 3), np.uint8)]
    assert [len(f) for f in detector.detect(images)] == [0, 0, 0]
    assert [len(f) for f in FaceDetector("cpu", DetectorConfig(min_face_size=40)).detect([np.zeros((30, 90, 3), np.uint8)])] == [0]


def test_batched_resampling_equals_facenets_interpolate_per_box():
    import torch
    from torch.nn.functional import interpolate

    batch = np.random.default_rng(0).integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    imgs = torch.as_tensor(batch).permute(0, 3, 1, 2).float()  # facenet's layout: channels-last strides
    edge_cases = [(0, 1, 0, 1), (69, 70, 89, 90), (0, 70, 0, 90), (0, 70, 5, 6), (3, 27, 0, 24), (10, 58, 42, 90),
                  (0, 13, 77, 90), (60, 70, 0, 47), (1, 66, 2, 67), (5, 7, 30, 85)]  # 1 px, borders, =, <, > 24 and 48
    rng = np.random.default_rng(1)
    top, left = rng.integers(0, 69, 40), rng.integers(0, 89, 40)
    random_boxes = zip(top, top + rng.integers(1, 71 - top), left, left + rng.integers(1, 91 - left))
    boxes = np.array(edge_cases + list(random_boxes))
    image_inds = np.arange(len(boxes)) % 2
    table = _summed_area_table(batch)
    for size, table in [(24, table), (48, table), (48, table.astype(np.float64))]:  # float64: the table of huge images
        batched = area_resampled(table, image_inds, *boxes.T, size)
        for crop, k, (y0, y1, x0, x1) in zip(batched, image_inds, boxes.tolist()):
            expected = interpolate(imgs[k, :, y0:y1, x0:x1].unsqueeze(0), size=(size, size), mode="area")[0]
            assert crop.dtype == np.float32
            torch.testing.assert_close(torch.as_tensor(crop), expected, rtol=1e-6, atol=1e-5)


def test_pyramid_levels_equal_facenets_imresample():
    import torch
    from facenet_pytorch.models.utils.detect_face import imresample

    batch = np.random.default_rng(2).integers(0, 256, (3, 75, 131, 3), dtype=np.uint8)
    imgs = torch.as_tensor(batch).permute(0, 3, 1, 2).float()  # as `_detect_batch` holds them
    table = _summed_area_table(batch)
    for size in [(46, 81), (33, 57), (12, 12), (75, 131), (90, 140)]:  # shrinking, whole, enlarging (levels >= 12 px)
        assert torch.equal(torch.as_tensor(whole_images_resampled(table, size)), imresample(imgs, size))


def test_boxes_wholly_outside_the_image_are_dropped_with_their_image_index():
    batch = np.zeros((2, 30, 40, 3), np.uint8)
    boxes = np.array([[-20.0, -20, -5, -5, 0.9], [2, 3, 20, 21, 0.8], [45, 0, 60, 15, 0.7], [30, 20, 50, 40, 0.6]], np.float32)
    kept, image_inds, crops = _box_crops(_summed_area_table(batch), boxes, np.array([0, 1, 0, 1]), 24)
    assert kept[:, 4].tolist() == pytest.approx([0.8, 0.6]) and image_inds.tolist() == [1, 1]
    assert crops.shape == (2, 3, 24, 24) and np.all(crops == np.float32(-127.5 * 0.0078125))


def _random_boxes(rng, n: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """n boxes [x1, y1, x2, y2, score] crowded on a 60 px square (many overlaps), scores with ties (as saturated
    networks give), in `groups` groups."""
    corner = rng.uniform(0, 60, (n, 2)).astype(np.float32)
    side = rng.uniform(4, 30, (n, 1)).astype(np.float32)
    scores = rng.choice(np.float32([0.61, 0.7, 0.95, 0.9999999, 1.0]), n) if n % 2 else rng.random(n).astype(np.float32)
    return np.concatenate([corner, corner + side, scores[:, None]], 1), rng.integers(0, groups, n)


@pytest.mark.parametrize("n, groups, threshold", [(0, 1, 0.5), (1, 1, 0.5), (40, 1, 0.7), (151, 6, 0.5), (600, 3, 0.7), (999, 40, 0.5),
                                                  (1500, 7, 0.5)])  # over 1,000 torchvision loops over the groups
def test_nms_equals_torchvisions_batched_nms(n, groups, threshold):
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(n)
    boxes, image_inds = _random_boxes(rng, n, groups)
    expected = batched_nms(torch.as_tensor(boxes[:, :4]), torch.as_tensor(boxes[:, 4]), torch.as_tensor(image_inds), threshold)
    assert _nms(boxes, image_inds, threshold).tolist() == expected.tolist()


def test_nms_min_equals_facenets_batched_nms_numpy():
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy

    for n, groups in [(0, 1), (1, 1), (30, 1), (85, 4)]:
        boxes, image_inds = _random_boxes(np.random.default_rng(n), n, groups)
        expected = batched_nms_numpy(torch.as_tensor(boxes[:, :4]), torch.as_tensor(boxes[:, 4]), torch.as_tensor(image_inds), 0.7, "Min")
        assert _nms_min(boxes, image_inds, 0.7).tolist() == expected.tolist()


def test_our_mtcnn_modules_answer_as_facenets_to_the_bit_and_detection_never_imports_facenet():
    """`c3ae_ray.mtcnn` rebuilds facenet-pytorch's networks so that a detecting process skips importing it (and
    torchvision): the same weights, the same answers, and neither package in a process that has detected."""
    import subprocess
    import sys

    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from c3ae_ray.mtcnn import Mtcnn

    ours = Mtcnn.pretrained()
    generator = torch.Generator().manual_seed(0)
    for theirs, mine, shape in ((PNet(), ours.pnet, (2, 3, 37, 53)), (RNet(), ours.rnet, (5, 3, 24, 24)), (ONet(), ours.onet, (3, 3, 48, 48))):
        x = torch.rand(shape, generator=generator) * 2 - 1
        with torch.inference_mode():
            expected, answers = theirs(x), mine(x)
        assert len(answers) == len(expected) and all(torch.equal(a, b) for a, b in zip(answers, expected)), type(mine).__name__
    script = ("import sys, numpy as np; from c3ae_ray.detect import FaceDetector; "
              "FaceDetector('cpu').detect([np.full((64, 64, 3), 128, np.uint8)]); "
              "print(sorted(m for m in ('facenet_pytorch', 'torchvision') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "[]"
