"""An append-only log of numbered JSON entries on local disk or s3:// (Ray-free).

Entry N is the object `<dir>/<N:08d>.json`, written only if it does not exist yet: with
`O_CREAT|O_EXCL` on local disk and S3's conditional PUT (`If-None-Match: *`) on s3. Two writers
that both append entry N cannot both succeed, so every change to the log is kept and each writer
learns whether it won. pyarrow's filesystems have no conditional write, hence boto3 for that one
call on s3 (its reads and listings stay on pyarrow, as everywhere else).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from oikyo_ray.errors import RegistryError
from oikyo_ray.runs.store import join, list_files, read_text

WIDTH = 8  # entries sort by name as they do by number


def entry_name(n: int) -> str:
    return f"{n:0{WIDTH}d}.json"


def read_log(uri: str, after: int = 0) -> list[dict]:
    """Every entry after the first `after`, in order; [] for a log not started. A gap or a
    non-JSON entry is an error (entries are never deleted or rewritten, so a reader that has the
    first `after` only needs the rest)."""
    names = sorted(n for n in list_files(uri) if n.endswith(".json"))
    entries = []
    for i, name in enumerate(names, start=1):
        if i <= after:
            continue
        if name != entry_name(i):
            raise RegistryError(f"{join(uri, name)}: expected entry {entry_name(i)} here; the log was edited by hand")
        text = read_text(join(uri, name))
        try:
            entries.append(json.loads(text or ""))
        except json.JSONDecodeError as e:
            raise RegistryError(f"{join(uri, name)} is not valid JSON ({e.msg}); the log was edited by hand") from None
    return entries


def append_at(uri: str, n: int, entry: dict) -> bool:
    """Write entry `n` unless it exists; False when another writer got there first."""
    data = (json.dumps(entry, sort_keys=True) + "\n").encode()
    target = join(uri, entry_name(n))
    if target.startswith("s3://"):
        return _put_if_absent_s3(target, data)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"  # one per writer, threads of one process included
    Path(tmp).write_bytes(data)
    try:
        os.link(tmp, target)  # atomic create-if-absent of a complete file (no reader sees half of it)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _put_if_absent_s3(uri: str, data: bytes) -> bool:
    bucket, _, key = uri[len("s3://") :].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise RegistryError(f"cannot write {uri}: {code}", hint="check the bucket and the AWS credentials") from None
    return True
