"""lm-evaluation-harness tasks on the base and the fine-tuned model, side by side (Ray-free).

    check_tasks(ec) -> None                    eval.lm_eval_tasks and eval.lm_eval_max_drop, before Ray starts
    evaluate_tasks(cfg, model_path, tuned_dir) -> report["lm_eval"]: per task and metric base, tuned, delta

`eval.lm_eval_tasks` names registered lm-eval tasks (`hellaswag`, ...; their datasets must be
downloadable or in the datasets cache), the shipped demo task `oikyo_demo_mc`, or paths to task
YAML files or folders of them. A local YAML's relative `dataset_kwargs.data_files` are read
relative to the YAML (lm-eval itself reads them relative to the working directory), so a task
folder with its JSONL runs offline from anywhere.

Both models are loaded by `model/load.py` (safetensors only, model.trust_remote_code as set), the
fine-tuned one as base + adapter, and handed to lm-eval's HFLM as loaded models. Results are cached
per (model, task) as JSON under eval.lm_eval_cache_dir: the key hashes the model's files (and the
adapter's), model.dtype, the task's config and local data files, the limit, the few-shot count and
the harness version, so a second evaluation of the same base re-runs nothing for the base.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # private: tests/test_private_apis.py
from peft import PeftModel
from transformers import AutoConfig

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import ConfigError, DataError
from oikyo_ray.eval.scoring import MODELS, is_adapter_dir
from oikyo_ray.model.load import load_model, load_tokenizer

ASSETS = Path(__file__).parent / "assets"  # oikyo_demo_mc.yaml: the shipped demo task, found by name
FIELD = "eval.lm_eval_tasks"
CACHE_FORMAT = 1  # bump when what a cache file holds changes
# stderr draws for metrics without a closed form: lm-eval's default, 100000, re-scores a corpus metric
# such as BLEU that many times
BOOTSTRAP_ITERS = 1000
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' file builders: data_files are paths


def default_cache_dir(cfg: OikyoConfig) -> Path:
    """eval.lm_eval_cache_dir, or <model.cache_dir>/lm_eval."""
    return Path(cfg.eval.lm_eval_cache_dir or Path(cfg.model.cache_dir) / "lm_eval").expanduser()


# ---- which tasks: names and local YAMLs


def _is_path(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or "/" in entry or entry.startswith(("~", "."))


def _yaml_files(entry: str) -> list[Path]:
    """A path entry as the task YAML files it stands for (a folder: every YAML under it that defines a task)."""
    p = Path(entry).expanduser()
    if p.is_file():
        return [p.resolve()]
    if p.is_dir():
        # leaf tasks only: a group file's `task:` is a list of its members (name the group to run it as one)
        found = [f.resolve() for f in sorted(p.glob("**/*.y*ml")) if _is_task(_read_yaml(f, entry))]
        if found:
            return found
        raise ConfigError(
            f"{FIELD}: {entry} holds no task YAML (no .yaml file with a 'task:' key)",
            hint="point it at a task YAML file, or a folder of them",
        )
    raise ConfigError(
        f"{FIELD}: {entry} does not exist",
        hint="give a registered lm-eval task name (lm_eval ls tasks), oikyo_demo_mc, or the path of a task YAML",
    )


def _is_task(cfg: dict) -> bool:
    return isinstance(cfg.get("task"), str) and "group" not in cfg


def _read_yaml(path: Path, entry: str) -> dict:
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # lm-eval's loader raises yaml, OS and value errors alike
        why = " ".join(str(e).split())
        raise ConfigError(f"{FIELD}: {entry}: {path} is not a readable task YAML: {why}") from None
    return cfg


def _task_manager(ec) -> TaskManager:
    """Knows the shipped task and those of the folders listed (a group YAML finds its tasks by name);
    lm-eval's own registry takes seconds to index: only included when a name may be one of its tasks."""
    folders = [
        ASSETS,
        *(Path(t).expanduser() for t in ec.lm_eval_tasks if _is_path(t) and Path(t).expanduser().is_dir()),
    ]
    named = [t for t in ec.lm_eval_tasks if not _is_path(t) and t not in _shipped_names()]
    return TaskManager(include_path=[str(f) for f in folders], include_defaults=bool(named))


def _shipped_names() -> set[str]:
    return {str(load_yaml(f, resolve_func=False).get("task")) for f in ASSETS.glob("*.yaml")}


def _local_spec(path: Path, entry: str) -> str | dict:
    """The spec lm-eval loads for one YAML: the path itself, or, when its `data_files` are
    relative, its config with them made absolute against the YAML's folder."""
    cfg = _read_yaml(path, entry)
    if not isinstance(cfg.get("task") or cfg.get("group"), str):
        raise ConfigError(
            f"{FIELD}: {entry}: {path} defines no task (no 'task:' or 'group:' name)",
            hint="a task YAML names its task with 'task: <name>'",
        )
    kwargs = cfg.get("dataset_kwargs") or {}
    if cfg.get("dataset_path") not in LOCAL_BUILDERS or "data_files" not in kwargs:
        return str(path)
    files = kwargs["data_files"]

    def absolute(f: str) -> str:
        return f if Path(f).expanduser().is_absolute() or "://" in f else str(path.parent / f)

    fixed: str | list[str] | dict[str, str | list[str]]
    if isinstance(files, str):
        fixed = absolute(files)
    elif isinstance(files, list):
        fixed = [absolute(f) for f in files]
    else:
        fixed = {k: absolute(v) if isinstance(v, str) else [absolute(f) for f in v] for k, v in files.items()}
    if fixed == files:
        return str(path)
    full = load_yaml(path, resolve_func=True)  # !function entries resolved from the YAML's folder, as lm-eval does
    full["dataset_kwargs"] = {**full["dataset_kwargs"], "data_files": fixed}
    return full


def _specs(ec, tm: TaskManager) -> list[tuple[str, str | dict]]:
    """(entry of eval.lm_eval_tasks, what TaskManager.load takes) for every task asked for."""
    specs: list[tuple[str, str | dict]] = []
    for entry in ec.lm_eval_tasks:
        if _is_path(entry):
            specs += [(entry, _local_spec(f, entry)) for f in _yaml_files(entry)]
            continue
        found = tm.task_index.get(entry)
        if found is None:
            raise ConfigError(
                f"{FIELD}: '{entry}' is neither a registered lm-eval task, group or tag nor a file",
                hint="check the name (lm_eval ls tasks), or give the path of a task YAML "
                "(a path needs a '/' or a .yaml suffix)",
            )
        path = getattr(found, "yaml_path", None)
        specs.append((entry, _local_spec(Path(path), entry) if path and Path(path).parent == ASSETS else entry))
    return specs


def _declared(spec: str | dict, tm: TaskManager) -> tuple[set[str], bool]:
    """The task or group name a spec declares before it is built, and whether it expands to
    tasks of other names (a group or a tag)."""
    if isinstance(spec, str) and not _is_path(spec):
        kind = getattr(tm.task_index.get(spec), "kind", None)
        return {spec}, str(getattr(kind, "name", kind)).lower() not in ("task", "py_task")
    cfg = spec if isinstance(spec, dict) else load_yaml(spec, resolve_func=False)
    if isinstance(cfg.get("group"), str):
        return {cfg["group"]}, True
    return {str(cfg.get("task"))}, False


def check_tasks(ec, tm: TaskManager | None = None) -> None:
    """What eval.lm_eval_tasks and eval.lm_eval_max_drop get wrong, found before Ray starts or a
    model loads: missing files, unknown names, tasks listed twice, gates on tasks not asked for."""
    if not ec.lm_eval_tasks:
        if ec.lm_eval_max_drop:
            raise ConfigError(
                "eval.lm_eval_max_drop gates lm-eval tasks, but eval.lm_eval_tasks is empty",
                hint="list the tasks in eval.lm_eval_tasks, or drop eval.lm_eval_max_drop",
            )
        return
    tm = tm or _task_manager(ec)
    declared = [_declared(s, tm) for _, s in _specs(ec, tm)]
    known = set().union(*(names for names, _ in declared))
    if len(known) < len(declared):  # lm-eval refuses one task twice in a run
        twice = sorted(n for n in known if sum(n in names for names, _ in declared) > 1)
        raise ConfigError(f"{FIELD} lists {', '.join(twice)} more than once", hint="list each task once")
    # a group or tag expands to tasks only known once built: gates on those fail then if they did not run
    if any(expands for _, expands in declared):
        return
    for key in ec.lm_eval_max_drop:
        task = key.split("/", 1)[0]
        if task not in known:
            raise ConfigError(
                f"eval.lm_eval_max_drop: '{key}' names task '{task}', which eval.lm_eval_tasks does not run",
                hint=f"use one of {sorted(known)} (as 'task' or 'task/metric')",
            )


# ---- identities: what a cached result depends on


def _sha_file(path: Path, memo: dict) -> str:
    """Content hash of a file, remembered by (path, size, mtime) so big weights are read once."""
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def _unchanged(key: str) -> bool:
    """Whether a file-hash memo entry still describes its file (stale ones are dropped)."""
    path, size, mtime = key.rsplit(":", 2)
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return f"{st.st_size}:{st.st_mtime_ns}" == f"{size}:{mtime}"


def dir_identity(path: str | Path, memo: dict) -> str:
    """Hash of every file's name and content under a model or adapter dir (hidden files aside)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if not any(part.startswith(".") for part in Path(rel).parts):
            h.update(f"{rel}\0{_sha_file(f, memo)}\n".encode())
    return h.hexdigest()


def _model_identity(cfg: OikyoConfig, model_path: str, memo: dict) -> str:
    """A local model dir by content; a hub id by the commit its config resolved to."""
    if Path(model_path).expanduser().is_dir():
        ident = dir_identity(Path(model_path).expanduser(), memo)
    else:
        conf = AutoConfig.from_pretrained(
            model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
        ident = f"hub:{model_path}@{getattr(conf, '_commit_hash', None) or cfg.model.revision}"
    return f"{ident}:{cfg.model.dtype}"


def _describe(x):
    """JSON of a task config: functions (from !function) by name and source, not their address."""
    if callable(x):
        try:
            src = inspect.getsource(x)
        except (OSError, TypeError):
            src = ""
        return (
            f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__name__)}:"
            + hashlib.sha256(src.encode()).hexdigest()[:16]
        )
    return str(x)


def _task_identity(task, memo: dict) -> str:
    conf = task.dump_config()
    conf.get("metadata", {}).pop("config_source", None)  # where the YAML sits is not what it is
    h = hashlib.sha256(json.dumps(conf, sort_keys=True, default=_describe).encode())
    files = (conf.get("dataset_kwargs") or {}).get("data_files")
    flat = [files] if isinstance(files, str) else files if isinstance(files, list) else []
    if isinstance(files, dict):
        flat = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    for f in flat:  # local data by content (the path may move)
        if Path(f).expanduser().is_file():
            h.update(_sha_file(Path(f).expanduser().resolve(), memo).encode())
    return h.hexdigest()


# ---- the cache


@dataclass
class _Entry:
    """One entry of eval.lm_eval_tasks as built: its leaf tasks and groups."""

    entry: str
    spec: str | dict
    loaded: dict  # TaskManager.load's result
    name: str  # the task or group it declares


def _cache_key(model_id: str, task_id: str, ec) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "lm_eval": lm_eval.__version__,
        "model": model_id,
        "task": task_id,
        "limit": ec.lm_eval_limit,
        "num_fewshot": ec.lm_eval_num_fewshot,
        "bootstrap_iters": BOOTSTRAP_ITERS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)  # whole or absent: a killed run leaves no half-written cache file


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent or damaged: evaluated again


# ---- running lm-eval


class _Models:
    """Base and fine-tuned, loaded on first need: a fully cached model is never loaded."""

    def __init__(self, cfg: OikyoConfig, model_path: str, tuned_dir: str):
        self.cfg, self.model_path, self.tuned_dir = cfg, model_path, tuned_dir
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = None
        self._base = None

    def lm(self, which: str, batch_size: int) -> HFLM:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.cfg.model, self.model_path)
        if which == "base":
            self._base = load_model(self.cfg.model, self.model_path).to(self.device).eval()
            model = self._base
        elif is_adapter_dir(self.tuned_dir):
            base = self._base if self._base is not None else load_model(self.cfg.model, self.model_path)
            # the adapter goes onto the base in place: the base side already ran, or was cached
            model = PeftModel.from_pretrained(base, self.tuned_dir).to(self.device).eval()
        else:
            model = load_model(self.cfg.model, self.tuned_dir).to(self.device).eval()
        return HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=batch_size)


def _leaf_metrics(results: dict, higher: dict, names: list[str]) -> dict:
    """{task: {metric: {value, stderr, higher_is_better}}} from lm-eval's results for `names`
    (metric keys as lm-eval writes them, "metric,filter"; filter "none" dropped)."""
    out: dict = {}
    for name in names:
        got = results.get(name) or {}
        for key, value in got.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric}/{filt}"
            stderr = got.get(f"{metric}_stderr,{filt}")
            out.setdefault(name, {})[label] = {
                "value": float(value) if isinstance(value, (int, float)) else float("nan"),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": bool((higher.get(name) or {}).get(metric, True)),
            }
    return out


def _run(lm: HFLM, todo: list[_Entry], ec, tm: TaskManager) -> dict[str, dict]:
    """lm-eval on the entries in `todo`: per entry, {tasks: {task: metrics}, n: {task: docs}}."""
    specs: list = []
    for e in todo:  # each entry's top-level groups (they hold their tasks) and the tasks outside any group
        groups, children = e.loaded.get("groups", {}), e.loaded.get("group_map", {})
        top = [g for name, g in groups.items() if not any(name in c for c in children.values())]
        inside = {t.task_name for g in top for t in g.get_all_tasks()}
        specs += top + [t for name, t in e.loaded["tasks"].items() if name not in inside]
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=ec.lm_eval_num_fewshot,
        limit=ec.lm_eval_limit,
        batch_size=ec.lm_eval_batch_size,
        task_manager=tm,
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    if out is None:
        raise DataError(f"{FIELD}: lm-eval returned no results (not rank 0 of a distributed launch?)")
    higher = out.get("higher_is_better", {})
    per: dict[str, dict] = {}
    for e in todo:
        names = [*e.loaded.get("groups", {}), *e.loaded["tasks"]]
        per[e.entry + "\0" + e.name] = {
            "tasks": _leaf_metrics(out["results"], higher, names),
            "n": {t: int((out.get("n-samples", {}).get(t) or {}).get("effective", 0)) for t in e.loaded["tasks"]},
        }
    return per


def _build(ec, tm: TaskManager) -> list[_Entry]:
    built = []
    for entry, spec in _specs(ec, tm):
        try:
            loaded = tm.load([spec])
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
            raise DataError(
                f"{FIELD}: cannot load task '{entry}': {e}",
                hint="a registered task's dataset must be downloadable or already cached; a local YAML's "
                "data_files must exist (relative paths are read from the YAML's folder)",
            ) from None
        built.append(_Entry(entry, spec, loaded, sorted(_declared(spec, tm)[0])[0]))
    return built


def evaluate_tasks(cfg: OikyoConfig, model_path: str, tuned_dir: str, log=print) -> dict:
    """The report's "lm_eval" section: per task and metric, base, tuned, delta and stderr; which
    results came from the cache; the settings they were computed with."""
    ec = cfg.eval
    tm = _task_manager(ec)
    check_tasks(ec, tm)
    entries = _build(ec, tm)
    cache = default_cache_dir(cfg)
    memo_path = cache / "file_hashes.json"
    memo = _read_json(memo_path) or {}
    base_id = _model_identity(cfg, model_path, memo)
    ids = {"base": base_id, "tuned": hashlib.sha256(f"{base_id}+{dir_identity(tuned_dir, memo)}".encode()).hexdigest()}
    task_ids = {e.entry + "\0" + e.name: _tasks_identity(e, memo) for e in entries}
    _write_json(memo_path, {k: v for k, v in memo.items() if _unchanged(k)})
    models = _Models(cfg, model_path, tuned_dir)
    got: dict[str, dict[str, dict]] = {}
    cached: dict[str, list[str]] = {}
    for which in MODELS:  # base first: an adapter is put onto the loaded base in place
        files = {k: cache / f"{_cache_key(ids[which], tid, ec)}.json" for k, tid in task_ids.items()}
        got[which] = {}
        for k, f in files.items():
            hit = _read_json(f)
            if hit and hit.get("format") == CACHE_FORMAT:
                got[which][k] = hit["result"]
        cached[which] = [k.split("\0")[1] for k in got[which]]
        todo = [e for e in entries if e.entry + "\0" + e.name not in got[which]]
        if todo:
            log(f"[oikyo] lm-eval: {', '.join(e.name for e in todo)} on the {which} model")
            for k, result in _run(models.lm(which, ec.lm_eval_batch_size), todo, ec, tm).items():
                got[which][k] = result
                _write_json(
                    files[k], {"format": CACHE_FORMAT, "model": which, "entry": k.split("\0")[0], "result": result}
                )
    return _side_by_side(ec, list(task_ids), got, cached, cache)


def _tasks_identity(e: _Entry, memo: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(e.loaded["tasks"]):
        h.update(f"{name}\0{_task_identity(e.loaded['tasks'][name], memo)}\n".encode())
    for name in sorted(e.loaded.get("groups", {})):
        h.update(f"group:{name}\n".encode())
    return h.hexdigest()


def _side_by_side(ec, keys: list[str], got: dict, cached: dict, cache: Path) -> dict:
    """The report section, tasks in the order eval.lm_eval_tasks lists them (cached or not)."""
    tasks: dict = {}
    for k in keys:
        b, t = got["base"][k], got["tuned"][k]
        for task, metrics in b["tasks"].items():
            row = {}
            for m, bv in metrics.items():
                tv = t["tasks"].get(task, {}).get(m, {"value": float("nan"), "stderr": None})
                d = tv["value"] - bv["value"]
                row[m] = {
                    "base": bv["value"],
                    "tuned": tv["value"],
                    "delta": d,
                    # how far the tuned score fell short of the base's, for the gates: lower-is-better reversed
                    "drop": -d if bv["higher_is_better"] else d,
                    "base_stderr": bv["stderr"],
                    "tuned_stderr": tv["stderr"],
                    "higher_is_better": bv["higher_is_better"],
                }
            tasks[task] = {"entry": k.split("\0")[0], "n": b["n"].get(task), "metrics": row}
    return {
        "tasks": tasks,
        "cached": cached,
        "limit": ec.lm_eval_limit,
        "num_fewshot": ec.lm_eval_num_fewshot,
        "lm_eval_version": lm_eval.__version__,
        "cache_dir": str(cache),
    }
