"""Traffic capture and feedback storage (Ray-free): rows handed over by the app are redacted,
capped and written as parquet by one background thread, never in the request's path.

    w = ParquetWriter(store.join(root, "completions"), redactor, counts=on_outcome)
    w.offer(row)        # False (and counted as dropped) when the bounded queue is full
    w.close()           # flushes what is queued

Layout (hive partitions, readable by `pyarrow.dataset` and Ray Data; a row's served name, e.g.
`bot-v2`, is its `served` column, its registry model and version the partitions):
    <root>/completions/date=YYYY-MM-DD/model=NAME/version=V/part-<ms>-<id>.parquet
    <root>/feedback/date=YYYY-MM-DD/model=NAME/version=V/part-<ms>-<id>.parquet
A write that fails (storage down) drops its rows and counts them: serving goes on either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from oikyo_ray.runs import store

log = logging.getLogger(__name__)
TEXT_FIELDS = ("prompt", "completion", "correction", "comment")
VERSION_OF = re.compile(r"^(?P<model>.+)-v(?P<version>\d+)$")  # registry variants: NAME-vN


def sampled(completion_id: str, rate: float) -> bool:
    """Whether a completion is captured: a hash of its id, so a retry of a write or a second
    look at the same id decides the same way."""
    if rate >= 1:
        return True
    return int(hashlib.sha256(completion_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < rate


def user_key(user: str | None) -> str | None:
    """A stable pseudonym for the client's user id: rows of one user can be grouped (and deleted
    on request) without the id itself being stored."""
    return None if not user else hashlib.sha256(f"oikyo-user:{user}".encode()).hexdigest()[:16]


def capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[{len(text) - limit} more characters dropped]"


def partition(model: str) -> tuple[str, str]:
    """(model, version) of a served name: a registry variant NAME-vN is NAME's version N."""
    m = VERSION_OF.match(model)
    return (m["model"], m["version"]) if m else (model, "-")


def _path_part(value: str) -> str:
    # hive partition values: names are already checked by the app; keep the path one level deep
    return re.sub(r"[^A-Za-z0-9._-]", "_", value) or "_"


class ParquetWriter:
    """A bounded queue drained by a daemon thread that writes a part file per partition every
    `flush_rows` rows or `flush_s` seconds; text fields are redacted and capped on that thread."""

    def __init__(
        self,
        root: str,
        redactor: Callable[[str], str] | None,
        max_chars: int = 20_000,
        queue_rows: int = 10_000,
        flush_rows: int = 500,
        flush_s: float = 10.0,
        retention_days: int | None = None,
        counts: Callable[[str, int], None] = lambda outcome, n: None,
    ) -> None:
        self.root, self.redactor, self.max_chars = root, redactor, max_chars
        self.flush_rows, self.flush_s, self.retention_days = flush_rows, flush_s, retention_days
        self.counts = counts  # (outcome, rows): written | dropped_full | dropped_error | dropped_redaction
        self.queue: queue.Queue[dict | None] = queue.Queue(maxsize=queue_rows)
        self.closed = threading.Event()
        self._last_prune = 0.0
        self.thread = threading.Thread(target=self._run, name="oikyo-capture", daemon=True)
        self.thread.start()

    def offer(self, row: dict) -> bool:
        """Queue a row without waiting; a full queue drops it (counted)."""
        if self.closed.is_set():
            return False
        try:
            self.queue.put_nowait(row)
            return True
        except queue.Full:
            self.counts("dropped_full", 1)
            return False

    def close(self, timeout: float = 30) -> None:
        """Write what is queued and stop the thread."""
        if not self.closed.is_set():
            self.closed.set()
            self.queue.put(None)
            self.thread.join(timeout)

    def _run(self) -> None:
        rows: list[dict] = []
        deadline = time.monotonic() + self.flush_s
        while True:
            try:
                row = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:  # the flush interval passed
                row = {}
            if row is None:
                self._flush(rows)
                return
            if row:
                rows.append(row)
            if len(rows) >= self.flush_rows or time.monotonic() >= deadline:
                self._flush(rows)
                rows, deadline = [], time.monotonic() + self.flush_s

    def _clean(self, row: dict) -> dict:
        out = dict(row)
        for k in TEXT_FIELDS:
            if isinstance(out.get(k), str):
                text = capped(out[k], self.max_chars)
                out[k] = self.redactor(text) if self.redactor else text
        return out

    def _flush(self, rows: list[dict]) -> None:
        if not rows:
            return
        clean, failed = [], 0
        for row in rows:
            try:
                clean.append(self._clean(row))
            except Exception:  # noqa: BLE001 - a user redactor that raises loses its row, not the batch
                failed += 1
                log.exception("capture: the redactor failed on a row; the row is dropped")
        if failed:
            self.counts("dropped_redaction", failed)
        groups: dict[tuple[str, str, str], list[dict]] = {}
        for row in clean:
            day = datetime.fromtimestamp(row["created"], UTC).strftime("%Y-%m-%d")
            groups.setdefault((day, *partition(row.get("model", "?"))), []).append(row)
        for (day, model, version), part in groups.items():
            path = store.join(
                self.root,
                f"date={day}",
                f"model={_path_part(model)}",
                f"version={_path_part(version)}",
                f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet",
            )
            try:
                # the served name (NAME-vN) as `served`: `model` and `version` are the partitions
                write_rows(path, [{**{k: v for k, v in r.items() if k != "model"}, "served": r["model"]} for r in part])
                self.counts("written", len(part))
            except Exception:  # noqa: BLE001 - storage errors of any kind: serving goes on without it
                self.counts("dropped_error", len(part))
                log.exception("capture: writing %d rows to %s failed; they are dropped", len(part), path)
        self._prune()

    def _prune(self) -> None:
        """Delete date partitions older than the retention (checked at most hourly)."""
        if self.retention_days is None or time.time() - self._last_prune < 3600:
            return
        self._last_prune = time.time()
        cutoff = (datetime.now(UTC) - timedelta(days=self.retention_days)).strftime("%Y-%m-%d")
        try:
            for name in store.list_dirs(self.root):
                if name.startswith("date=") and name[5:] < cutoff:
                    store.delete_dir(store.join(self.root, name))
        except Exception:  # noqa: BLE001 - retention is retried next hour
            log.exception("capture: pruning %s failed", self.root)


def write_rows(path: str, rows: list[dict]) -> None:
    """One parquet file of `rows` (nested values as JSON text: one schema whatever they hold)."""
    flat = [{k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in r.items()} for r in rows]
    fs, p = store.filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    table = pa.Table.from_pylist(flat)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, p, filesystem=fs)  # an S3 object appears only once it is complete
        return
    # a local file is visible while it is written: write a hidden name (datasets skip "." names)
    # and rename it, so a reader never opens half a file
    tmp = f"{parent}/.{p.rsplit('/', 1)[1]}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, p)


def read_rows(root: str) -> list[dict]:
    """Every row under a capture root (tests, `oikyo drift`); partition columns included."""
    fs, p = store.filesystem(root)
    try:
        found = ds.dataset(p, filesystem=fs, format="parquet", partitioning="hive")
    except FileNotFoundError:
        return []
    parts = [f.physical_schema for f in found.get_fragments()]
    if not parts:
        return []
    # part files differ where a column was all null in one (type null) or absent (fields changed)
    schema = pa.unify_schemas([found.schema, *parts], promote_options="permissive")
    return ds.dataset(p, schema=schema, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()
