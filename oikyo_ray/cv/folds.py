"""k-fold cross-validation over a prepared dataset (Ray-free): folds, their data, the summary.

    folds = write_folds(data_dir, out_dir, k, salt)    out_dir/fold-<i>/data/{train,val,test}/ + manifest.json
    summary = summarise(per_fold)                      metric -> {mean, std, values}
    table = markdown(summary, k)

The rows of train and val are pooled and cut into k folds; fold i validates on its rows and
trains on the others. The test split is left as it is: every fold is evaluated on the same test
rows, which no fold trains or validates on. A row's fold is its prompt's hash (the turns before
the answer, salted), so two answers to one prompt share a fold and a fold never validates on a
prompt it trains on, as the data stage keeps prompts from leaking across train, val and test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oikyo_ray.data.prepared import split_files
from oikyo_ray.errors import DataError


def fold_of(messages_json: str, k: int, salt: str) -> int:
    """The fold of a row, from its prompt (every turn but the last, the answer learned)."""
    prompt = json.loads(messages_json)[:-1]
    key = json.dumps([[m["role"], str(m.get("content", "")).strip()] for m in prompt], ensure_ascii=False)
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:15], 16) % k


def _read(data_dir: Path, split: str) -> pa.Table | None:
    return pq.read_table(str(data_dir / split)) if split_files(data_dir, split) else None


def write_folds(data_dir: Path, out_dir: Path, k: int, salt: str) -> list[tuple[Path, dict]]:
    """Write each fold's train/val (and the shared test) as a prepared dataset under
    out_dir/fold-<i>/data/ (a run directory's layout); returns [(fold run dir, its manifest)].
    Refuses a fold that would be empty: k is too large for the rows."""
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tables = [t for t in (_read(data_dir, "train"), _read(data_dir, "val")) if t is not None]
    if not tables:
        raise DataError(f"{data_dir}: no train or val rows to cut into folds")
    pool = pa.concat_tables(tables, promote_options="default")
    folds = [fold_of(m, k, salt) for m in pool.column("messages").to_pylist()]
    sizes = [folds.count(i) for i in range(k)]
    if min(sizes) == 0:
        raise DataError(
            f"cv.folds={k}: fold {sizes.index(0)} gets no rows of the {pool.num_rows} in train and val",
            hint="use fewer folds or more data",
        )
    out = []
    for i in range(k):
        fold_dir = Path(out_dir) / f"fold-{i}" / "data"
        if fold_dir.exists():
            shutil.rmtree(fold_dir)
        mask = pa.array([f == i for f in folds])
        parts = {"val": pool.filter(mask), "train": pool.filter(pc.invert(mask))}
        for split, table in parts.items():
            (fold_dir / split).mkdir(parents=True)
            pq.write_table(table, fold_dir / split / "part-0.parquet")
        shutil.copytree(data_dir / "test", fold_dir / "test")
        fold_manifest = copy.deepcopy(manifest)
        fold_manifest["counts"].update(train=parts["train"].num_rows, val=parts["val"].num_rows)
        fold_manifest["cv"] = {"fold": i, "folds": k, "salt": salt, "source": str(data_dir)}
        (fold_dir / "manifest.json").write_text(json.dumps(fold_manifest, indent=2))
        out.append((fold_dir.parent, fold_manifest))
    return out


def summarise(per_fold: list[dict[str, float]]) -> dict[str, dict]:
    """Mean and sample standard deviation (n - 1) of each metric every fold reports."""
    names = [m for m in per_fold[0] if all(m in f for f in per_fold)]
    out = {}
    for m in names:
        values = [float(f[m]) for f in per_fold]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else math.nan
        out[m] = {"mean": mean, "std": math.sqrt(var), "values": values}
    return out


def markdown(summary: dict[str, dict], k: int) -> str:
    rows = [f"| metric | mean ± std ({k} folds) | per fold |", "|---|---|---|"]
    for m, s in summary.items():
        per = ", ".join(f"{v:.4g}" for v in s["values"])
        rows.append(f"| {m} | {s['mean']:.4g} ± {s['std']:.2g} | {per} |")
    return "\n".join(rows)
