"""Local paths and object-store URIs (s3://, gs://) behind one interface, and publishing outputs whole.

Every stage writes its output into a staging folder beside the destination and publishes it only when it
is complete, with `summary.json` written last: a crash leaves a `*.partial-*` folder that no reader takes
for a finished dataset, and an existing output is replaced only once the new one is whole. On local disks
publishing is a directory rename (atomic); object stores have no rename, so files are moved one by one and
`summary.json` (which readers require) goes last.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from c3ae_ray.config import NotFoundError, OutputExistsError, UserError

SUMMARY = "summary.json"


class StorageError(UserError):
    """The output's store refused a write: a full or read-only disk, an object store gone or refusing."""


def refused_write(location: str, error: OSError) -> StorageError:
    """A StorageError naming the output and the store's own words (a Ray task's OSError carries them on its
    last line, after the task's name)."""
    words = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return StorageError(f"could not write {location}: {words} (nothing there looks complete; rerun when the store takes writes)")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/key' or a local path -> (pyarrow filesystem, path on it).

    An `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) in the environment points S3 at another server
    (MinIO, a loopback test server), as the AWS tools do; its credentials are then taken from the
    environment into the filesystem object, so Ray workers that unpickle it need no environment of their own.
    """
    if "://" not in location:
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    if location.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            filesystem = pafs.S3FileSystem(
                endpoint_override=host or scheme,
                scheme=scheme if host else "https",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                allow_bucket_creation=True,
            )
            return filesystem, location[len("s3://"):].rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(location)
    return filesystem, path.rstrip("/")


def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_nonempty(filesystem: pafs.FileSystem, path: str) -> bool:
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return bool(filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def check_writable(filesystem: pafs.FileSystem, path: str, overwrite: bool) -> None:
    """Refuse up front (before any work) to write over an existing output unless asked to replace it."""
    if is_nonempty(filesystem, path) and not overwrite:
        raise OutputExistsError(f"{path} already exists and is not empty: pass --overwrite to replace it")


def staging_path(path: str) -> str:
    return f"{path}.partial-{uuid.uuid4().hex[:8]}"


def files_under(filesystem: pafs.FileSystem, path: str) -> list[str]:
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def move_tree(filesystem: pafs.FileSystem, source: str, destination: str) -> None:
    """Rename a folder (local) or move its files one by one (object stores have no folder rename)."""
    if is_local(filesystem):
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        return
    for file in files_under(filesystem, source):
        filesystem.move(file, destination + file[len(source):])
    filesystem.delete_dir_contents(source, missing_dir_ok=True)


def delete_tree(filesystem: pafs.FileSystem, path: str) -> None:
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == pafs.FileType.File:
        filesystem.delete_file(path)


def read_bytes(location: str) -> bytes:
    """A whole (small) file from a local path or an object-store URI; FileNotFoundError when it is not there."""
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise NotFoundError(f"{location} does not exist or is not a file")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_json(filesystem: pafs.FileSystem, path: str, value) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(value, indent=2, sort_keys=False).encode() + b"\n")


def read_json(filesystem: pafs.FileSystem, path: str):
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def publish(filesystem: pafs.FileSystem, staging: str, destination: str, summary: dict, overwrite: bool) -> None:
    """Write summary.json into the complete staging folder, then put it at `destination`.

    The old output (if any, and `overwrite`) is set aside first and deleted only after the new one is in place.
    """
    if is_local(filesystem):
        write_json(filesystem, f"{staging}/{SUMMARY}", summary)
        old = None
        if exists(filesystem, destination):
            check_writable(filesystem, destination, overwrite)
            old = staging_path(destination) + ".old"
            os.replace(destination, old)
        move_tree(filesystem, staging, destination)
        if old:
            delete_tree(filesystem, old)
        return
    if exists(filesystem, destination):
        check_writable(filesystem, destination, overwrite)
        delete_tree(filesystem, destination)
    move_tree(filesystem, staging, destination)
    write_json(filesystem, f"{destination}/{SUMMARY}", summary)


def prepare_run_dir(
    filesystem: pafs.FileSystem, path: str, location: str, config: dict, overwrite: bool, resumable: set[str], kind: str
) -> bool:
    """Create or check a run folder that resumes; -> True when it holds an unfinished run with the same settings
    (the caller looks for what there is to resume), False when the run starts afresh.

    The run's effective `config` is saved as config.json when it starts; a rerun may differ from it only in
    the `resumable` keys. A finished run (summary.json) or a folder that is no run is kept unless `overwrite`.
    """
    config_path = f"{path}/config.json"
    if exists(filesystem, f"{path}/{SUMMARY}") and not overwrite:
        raise OutputExistsError(f"{location} holds a finished {kind}: pass --overwrite to run it again from scratch")
    if overwrite:
        delete_tree(filesystem, path)
    elif exists(filesystem, config_path):
        saved = read_json(filesystem, config_path)
        wanted = json.loads(json.dumps(config))
        changed = sorted(k for k in set(saved) | set(wanted) if k not in resumable and saved.get(k) != wanted.get(k))
        if changed:
            raise UserError(
                f"{location} holds an unfinished {kind} with other settings ({', '.join(changed)}): "
                "rerun it with the same settings to resume, or pass --overwrite to start over"
            )
        return True
    elif is_nonempty(filesystem, path):
        raise OutputExistsError(f"{location} exists and is not a {kind}: pass --overwrite to replace it")
    filesystem.create_dir(path, recursive=True)
    write_json(filesystem, config_path, config)
    return False


def require_complete(location: str) -> tuple[pafs.FileSystem, str, dict]:
    """A stage's output that a reader may use: it must hold summary.json (written last). -> (fs, path, summary)."""
    filesystem, path = resolve(location)
    if not exists(filesystem, path):
        raise NotFoundError(f"{location} does not exist")
    if not exists(filesystem, f"{path}/{SUMMARY}"):
        raise UserError(f"{location} has no {SUMMARY}: it is not a finished output (a crashed or running job?)")
    return filesystem, path, read_json(filesystem, f"{path}/{SUMMARY}")
