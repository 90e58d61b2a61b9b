"""The session's Ray cluster runs the crop geometry in Ray Data exactly as a direct call does."""

import numpy as np

from tests.oracles import face_crops


def test_crops_in_ray_data_equal_direct_calls(ray_session):
    import ray

    def crop_batch(batch: dict) -> dict:  # nested, so Ray ships it by value to workers that lack tests/
        images = zip(batch["image"], batch["shape"], batch["box"])
        return {"crops": np.stack([face_crops(i.reshape(s), b) for i, s, b in images]), "index": batch["index"]}

    rng = np.random.default_rng(0)
    items = []
    for index in range(6):
        height, width = rng.integers(40, 200, 2)
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        box = np.array([width * 0.2, height * 0.1, width * 0.7, height * 0.9], np.float32)
        items.append({"image": image.reshape(-1), "shape": np.array(image.shape), "box": box, "index": index})
    rows = (
        ray.data.from_items(items)
        .map_batches(crop_batch, batch_size=2, batch_format="numpy")
        .take_all()
    )
    assert sorted(row["index"] for row in rows) == list(range(6))
    for row in rows:
        item = items[row["index"]]
        expected = face_crops(item["image"].reshape(item["shape"]), item["box"])
        np.testing.assert_array_equal(row["crops"], expected)
