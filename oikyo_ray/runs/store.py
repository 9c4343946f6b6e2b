"""Run roots on local disk or s3:// (Ray-free).

A run under an s3:// root is assembled in a local staging directory (training, Ray Train and eval
keep writing plain files) and uploaded to <root>/<name>/ after each stage; readers (list, show,
compare) go through pyarrow filesystems, so local and s3 runs mix freely.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from oikyo_ray.errors import OikyoError
from oikyo_ray.storage import filesystem as _filesystem

UPLOADED = ".oikyo-uploaded.json"  # staging-only: size/mtime of each file already uploaded


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str | Path, *parts: str) -> str:
    """A run's URI (s3) or absolute path (local) plus relative parts."""
    base = str(uri).rstrip("/") if is_remote(uri) else str(Path(uri).expanduser().resolve())
    return "/".join([base, *parts])


def run_name(uri: str | Path) -> str:
    return PurePosixPath(join(uri)).name


def staging_dir(cache_dir: str, name: str) -> Path:
    """Where a run bound for s3 is assembled: same machine, same cache as the model."""
    return Path(cache_dir).expanduser().resolve() / "runs-staging" / name


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, path = _filesystem(str(uri))
    return fs, path.rstrip("/") or path


@contextmanager
def _errors(uri: str):
    """pyarrow's S3 errors (no endpoint, bad keys) as user errors that name the URI."""
    try:
        yield
    except (FileNotFoundError, OikyoError):
        raise
    except OSError as e:
        raise OikyoError(
            f"cannot access {uri}: {str(e).splitlines()[0][:300]}",
            hint="check AWS_ENDPOINT_URL, the AWS credentials and the bucket name" if is_remote(uri) else None,
        ) from None


def _require_bucket(fs: pafs.FileSystem, uri: str, path: str) -> None:
    bucket = path.split("/", 1)[0]
    if is_remote(uri) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise OikyoError(f"s3 bucket '{bucket}' not found ({uri})", hint="create it, or fix run.root / the URI")


def exists(uri: str) -> bool:
    """Whether a file or directory is there; a missing s3 bucket is an error, not False."""
    fs, path = filesystem(uri)
    with _errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return True
        _require_bucket(fs, uri, path)
        return False


def read_text(uri: str) -> str | None:
    """A small file's text, None when missing."""
    fs, path = filesystem(uri)
    with _errors(uri):
        try:
            with fs.open_input_stream(path) as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None


def write_text(uri: str, text: str) -> None:
    """A small file, parent directories created (local or s3://)."""
    fs, path = filesystem(uri)
    with _errors(uri):
        if "/" in path:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))


def _names(uri: str, kind: pafs.FileType) -> list[str]:
    fs, path = filesystem(uri)
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if not infos:
            _require_bucket(fs, uri, path)
        return [PurePosixPath(i.path).name for i in infos if i.type == kind]


def list_dirs(uri: str) -> list[str]:
    """Names of the sub-directories of uri ([] when it does not exist, but its bucket must)."""
    return _names(uri, pafs.FileType.Directory)


def list_files(uri: str) -> list[str]:
    """Names of the files directly in uri ([] when it does not exist, but its bucket must)."""
    return _names(uri, pafs.FileType.File)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    with _errors(uri):
        fs.delete_dir(path)


def _gone_top(local: Path, rel: str) -> str:
    """The outermost part of rel that is gone locally: a rotated checkpoint's dir, or the file."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if not (local / "/".join(parts[:i])).exists():
            return "/".join(parts[:i])
    return rel


def upload(local: Path, uri: str) -> None:
    """Copy local's new or changed files to uri and delete there what was uploaded before and is gone
    here (rotated checkpoints). Symlinks (a sweep trial's shared data/) are skipped."""
    fs, path = filesystem(uri)
    state_file = local / UPLOADED
    done = json.loads(state_file.read_text()) if state_file.is_file() else {}
    seen = set()
    try:
        with _errors(uri):
            for cur, dirs, files in os.walk(local):
                dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(cur, d))]
                for f in files:
                    src = os.path.join(cur, f)
                    rel = os.path.relpath(src, local).replace(os.sep, "/")
                    if rel == UPLOADED or os.path.islink(src):
                        continue
                    seen.add(rel)
                    st = os.stat(src)
                    if done.get(rel) != [st.st_size, st.st_mtime_ns]:
                        pafs.copy_files(
                            src, f"{path}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
                        )
                        done[rel] = [st.st_size, st.st_mtime_ns]
            for top in sorted({_gone_top(local, rel) for rel in done if rel not in seen}):
                # a gone directory at once: deleting file by file leaves S3 directory markers behind
                (fs.delete_file if top in done else fs.delete_dir)(f"{path}/{top}")
                done = {r: v for r, v in done.items() if r != top and not r.startswith(top + "/")}
    finally:  # what did reach the remote is not sent again
        state_file.write_text(json.dumps(done))


def download(uri: str, dest: Path, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> Path:
    """Copy a run (or the parts named in `only`, minus `skip`: relative files or dirs) to dest; the
    files are recorded as uploaded, so a later upload() sends only what changed."""
    fs, path = filesystem(uri)
    under = lambda rel, parts: any(rel == p or rel.startswith(p + "/") for p in parts)  # noqa: E731
    done = {}
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        for info in infos:
            rel = info.path[len(path) :].lstrip("/")
            if info.type != pafs.FileType.File or (only and not under(rel, only)) or under(rel, skip):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                info.path, str(dest / rel), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
            st = (dest / rel).stat()
            done[rel] = [st.st_size, st.st_mtime_ns]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / UPLOADED).write_text(json.dumps(done))
    return dest
