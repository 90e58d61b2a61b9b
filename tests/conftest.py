"""Shared fixtures. Test layers live in folders and get their marker from it:
unit (no Ray), integration (one local Ray per session), e2e (the `c3ae` command as typed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in ("unit", "integration", "e2e"):
            item.add_marker(layer)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it skip only when ../shared is absent (CI has it)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: fixed CPUs, capped object store, no dashboard.

    Ray Data hangs on 2 cores when an actor pool takes every CPU, so stages under test must leave
    headroom; 4 logical CPUs let a 2-actor pool and its tasks coexist on this machine's 2 cores.
    """
    import ray

    ray.init(
        num_cpus=4,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def face_parquet(ray_session, shared_data, tmp_path_factory) -> Path:
    """A real `preprocess` output of 40 UTKFace images (ages spread over the folder) for training tests."""
    from c3ae_ray.preprocess import PreprocessConfig, preprocess
    from tests import fixtures

    root = tmp_path_factory.mktemp("utk40")
    built = fixtures.make_utkface(root / "utkface", shared_data / "utkface", n=40)
    out = root / "faces"
    preprocess(PreprocessConfig(dataset="utkface", root=str(built["root"]), out=str(out), detectors=1))
    return out


@pytest.fixture(scope="session")
def utkface_val_parquet(ray_session, shared_data, tmp_path_factory) -> Path:
    """The shared `utkface` images that every bundled model's hash split held out (about 790, by file name, as
    `c3ae train` splits), copied under their own names into a folder `utkface` and run through `c3ae preprocess`:
    the faces the bundled model is measured on (its card's target row)."""
    from c3ae_ray.faces import in_validation, split_key
    from c3ae_ray.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("utk_val")
    (root / "utkface").mkdir()
    for image in sorted((shared_data / "utkface").iterdir()):
        if in_validation(split_key(image.name, None), 0.1):
            shutil.copyfile(image, root / "utkface" / image.name)
    out = root / "faces"
    preprocess(PreprocessConfig(dataset="utkface", root=str(root / "utkface"), out=str(out), detectors=2))
    return out


@pytest.fixture(scope="session")
def fgnet_parquet(ray_session, shared_data, tmp_path_factory) -> Path:
    """An FG-NET-layout fixture (4 invented subjects x 4 real UTKFace faces) preprocessed by the `c3ae
    preprocess` command, for the evaluation protocols."""
    from c3ae_ray.cli import main
    from tests import fixtures

    root = tmp_path_factory.mktemp("fgnet")
    built = fixtures.make_fgnet(root / "fgnet", shared_data / "utkface", subjects=4, per_subject=4)
    out = root / "faces"
    assert main(["preprocess", "--dataset", "fgnet", "--root", str(built["root"]), "--out", str(out), "--detectors", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback, with the bucket `c3ae-test`.

    The AWS_* variables point every S3 client in this process and its children (the CLI) at it; Ray's
    workers get the credentials inside the pickled pyarrow filesystem (see c3ae_ray.storage.resolve).
    """
    import os

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                      secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir("c3ae-test")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ensemble_file(tmp_path_factory) -> Path:
    """An untrained ensemble of 3 full C3AEs (seed 0) with gender and ethnicity heads and an age range, in one
    model file: what every consumer must take where it takes one model."""
    import torch

    from c3ae_ray.calibrate import AgeRange
    from c3ae_ray.config import to_dict
    from c3ae_ray.crops import CropConfig
    from c3ae_ray.model import Ensemble, ModelConfig, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ensemble3.pt"
    save_model(Ensemble(ModelConfig(gender_head=True, ethnicity_head=True), 3).eval(), path, crop_config=to_dict(CropConfig()),
               meta={"epochs": 0}, age_range=to_dict(AgeRange(coverage=0.8, below=(1.2,), above=(1.4,), faces=100)))
    return path


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """An untrained full C3AE (seed 0) with the gender and ethnicity heads, in the model-file format: enough for
    scoring and serving mechanics, where what is checked is that each face gets the model's own outputs
    (gender among them), not that they are right."""
    import torch

    from c3ae_ray.config import to_dict
    from c3ae_ray.crops import CropConfig
    from c3ae_ray.model import C3AE, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "seed0.pt"
    save_model(C3AE(gender_head=True, ethnicity_head=True).eval(), path, crop_config=to_dict(CropConfig()), meta={"epochs": 0})
    return path

