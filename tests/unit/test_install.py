"""The environment the Makefile builds: facenet-pytorch installed without its stale pins still works."""

import numpy as np


def test_mtcnn_loads_its_bundled_weights_and_finds_one_face(shared_data):
    import cv2
    from facenet_pytorch import MTCNN

    image = cv2.cvtColor(cv2.imread(str(shared_data / "faces" / "ivan.jpg")), cv2.COLOR_BGR2RGB)
    boxes, scores, landmarks = MTCNN(keep_all=True, device="cpu").detect(image, landmarks=True)
    assert boxes.shape == (1, 4) and scores[0] > 0.9 and landmarks.shape == (1, 5, 2)
    x1, y1, x2, y2 = boxes[0]
    assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
    assert np.all((landmarks[0] >= boxes[0][:2]) & (landmarks[0] <= boxes[0][2:]))  # eyes, nose, mouth in the box
