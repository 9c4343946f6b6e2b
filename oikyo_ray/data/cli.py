"""`oikyo data ...`: prepare a dataset on its own, and inspect a prepared one.

    oikyo data prepare CONFIG.yaml [key=value ...] [--out DIR] [--no-ray]
    oikyo data inspect DIR [--png PATH] [--top N]

`add_data_commands(subparsers)` registers both on the main parser's subparsers; each sets
`fn(args) -> exit code` like the other commands. `inspect` prints a report (inputs and their
hashes, counts per split and per filter, the commonest reject reasons, duplicates, leakage,
token lengths) and writes a token-length histogram PNG (matplotlib, Agg; no display needed).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from oikyo_ray.cluster import init_ray
from oikyo_ray.config import load_config
from oikyo_ray.data.manifest import SPLITS, data_config_hash
from oikyo_ray.data.prepared import read_column
from oikyo_ray.errors import DataError

PNG_NAME = "token_hist.png"


def add_data_commands(subparsers) -> None:
    d = subparsers.add_parser("data", help="prepare or inspect a dataset (curation without training)")
    sub = d.add_subparsers(dest="data_cmd", required=True)

    p = sub.add_parser("prepare", help="read, validate, dedupe, split and tokenise the data of a config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.max_length=1024")
    p.add_argument("--out", help="output directory (default: <run.root>/data/<data config hash>)")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (small data)")
    p.add_argument("--top", type=int, default=8, help="reject reasons to list (default 8)")
    p.set_defaults(fn=cmd_data_prepare)

    i = sub.add_parser("inspect", help="report on a prepared dataset and write its token histogram PNG")
    i.add_argument("dir", help="a prepared dataset (holds manifest.json), e.g. runs/<run>/data")
    i.add_argument("--png", help=f"where to write the histogram (default: DIR/{PNG_NAME})")
    i.add_argument("--top", type=int, default=8, help="reject reasons to list (default 8)")
    i.set_defaults(fn=cmd_data_inspect)


def cmd_data_prepare(args) -> int:
    # the stage (transformers, Ray) takes seconds to import: only `prepare` pays for it, not
    # every `oikyo` command that builds this parser
    from oikyo_ray.data import prepare, ray_data  # noqa: PLC0415
    from oikyo_ray.model.load import resolve_model_path  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)  # validated before Ray starts
    if not args.out and cfg.run.root.startswith("s3://"):
        raise DataError(f"run.root is {cfg.run.root}: data prepare writes locally", hint="pass --out DIR")
    out = Path(args.out) if args.out else Path(cfg.run.root) / "data" / data_config_hash(cfg.data)
    tokenizer_path = resolve_model_path(cfg.model)
    if args.no_ray:
        manifest = prepare.prepare(cfg, tokenizer_path, out)
    else:
        init_ray()
        manifest = ray_data.prepare(cfg, tokenizer_path, out)
    print(format_report(manifest, _read_rejects(out), out, top=args.top))
    return 0


def cmd_data_inspect(args) -> int:
    d = Path(args.dir)
    manifest = load_manifest(d)
    png = Path(args.png) if args.png else d / PNG_NAME
    print(format_report(manifest, _read_rejects(d), d, top=args.top))
    write_histogram_png(manifest, d, png)
    print(f"\ntoken-length histogram: {png}")
    return 0


def load_manifest(d: Path) -> dict:
    f = d / "manifest.json"
    if not f.is_file():
        raise DataError(f"no manifest.json in {d}", hint="pass a prepared dataset dir, e.g. runs/<run>/data")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_rejects(d: Path) -> list[dict]:
    f = d / "rejects.jsonl"
    if not f.is_file():
        return []
    with f.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


_REF = re.compile(r"\S+:\d+\b")
_NUM = re.compile(r"\d+(\.\d+)?")


def reason_pattern(reason: str) -> str:
    """A reason with its specifics (row references, numbers) blanked, to group alike reasons."""
    return _NUM.sub("<n>", _REF.sub("<source>:<row>", reason))


def _name(source: str) -> str:
    return Path(source).name or source


def format_report(manifest: dict, rejects: list[dict], d: Path, top: int = 8) -> str:
    """The human report on a prepared dataset (what `oikyo data inspect` prints)."""
    c = manifest["counts"]
    cache = manifest.get("cache", {})
    lines = [
        f"dataset {d}",
        f"  content hash {manifest['content_hash'][:16]}   data config {manifest.get('data_config_hash', '?')}   "
        f"cache key {cache.get('key', '?')}{' (reused)' if cache.get('hit') else ''}",
        f"  tokenizer {manifest.get('tokenizer', '?')} ({manifest.get('tokenizer_fingerprint', '?')})",
        "",
        f"{'input':<40} {'sha256':<12} {'read':>7} {'accepted':>9} {'rejected':>9}",
    ]
    for i in manifest.get("inputs", []):
        if isinstance(i, dict):
            lines.append(
                f"{_name(i['path'])[:40]:<40} {i['sha256'][:12]:<12} {i.get('read', 0):>7} "
                f"{i.get('accepted', 0):>9} {i.get('rejected', 0):>9}"
            )
    lines += [
        f"{'total':<40} {'':<12} {c['read']:>7} {c['accepted']:>9} {c['rejected']:>9}",
        "",
        "splits: " + ", ".join(f"{s} {c.get(s, 0)}" for s in SPLITS),
    ]
    filters = manifest.get("filters", {})
    if filters:
        lines += ["", "rejected by filter:"]
        lines += [f"  {k:<16} {v:>7}" for k, v in sorted(filters.items(), key=lambda kv: (-kv[1], kv[0]))]
    if rejects:
        groups = Counter(reason_pattern(r["reason"]) for r in rejects)
        example = {}
        for r in rejects:
            example.setdefault(reason_pattern(r["reason"]), r)
        lines += ["", f"top reject reasons ({len(groups)} kinds):"]
        for pat, n in groups.most_common(top):
            e = example[pat]
            lines.append(f"  {n:>6}  {pat}")
            lines.append(f"          e.g. {_name(e['source'])}:{e['row']}: {e['reason'][:160]}")
    dd = manifest.get("dedupe")
    if dd:
        lines += [
            "",
            f"duplicates removed: {dd.get('duplicate', 0)} exact, {dd.get('near_duplicate', 0)} near "
            f"(threshold {dd.get('near_threshold')})",
        ]
    lk = manifest.get("leakage")
    if lk:
        pairs = ", ".join(f"{k} {v}" for k, v in sorted(lk.get("pairs", {}).items())) or "none"
        lines.append(
            f"leakage ({lk.get('action')}, threshold {lk.get('threshold')}): {lk.get('exact', 0)} exact, "
            f"{lk.get('near', 0)} near, {lk.get('removed', 0)} removed; pairs: {pairs}"
        )
    meta = manifest.get("meta")
    if meta:
        lines.append(
            f"metadata kept: tools {meta['tools']}, preference pairs {meta['preference']}, "
            f"labels true {meta['label_true']} / false {meta['label_false']}"
        )
    t = manifest.get("tokens", {})
    if t:
        max_length = manifest.get("data_config", {}).get("max_length", "?")
        lines += [
            "",
            f"tokens: total {t['total']:,}, mean {t['mean']:.1f}, max {t['max']}, "
            f"truncated at data.max_length={max_length}: {t.get('truncated', 0)}",
        ]
        lines += _text_histogram(t.get("histogram"))
    pk = manifest.get("packing")
    if pk:
        lines += [
            "",
            f"packing: {pk['rows']} train rows in {pk['blocks']} blocks of {pk['length']} tokens, "
            f"{pk['efficiency']:.1%} real tokens (right-padded batches of {pk['padded_batch_size']}: "
            f"{pk['padded_efficiency']:.1%})",
        ]
    return "\n".join(lines)


def _text_histogram(h: dict | None, width: int = 40) -> list[str]:
    if not h:
        return []
    edges = h["edges"]
    totals = [sum(h.get(s, [0] * (len(edges) - 1))[i] for s in SPLITS) for i in range(len(edges) - 1)]
    peak = max(totals) or 1
    return [
        f"  {edges[i]:>6}-{edges[i + 1]:<6} {'#' * round(width * n / peak):<{width}} {n}" for i, n in enumerate(totals)
    ]


def _lengths(d: Path) -> dict[str, list[int]] | None:
    """num_tokens of every kept row per split, from the parquet shards (None when absent)."""
    out = {s: read_column(d, s, "num_tokens") for s in SPLITS}
    return out if any(out.values()) else None


def write_histogram_png(manifest: dict, d: Path, png: Path) -> Path:
    """Token lengths per split as a stacked histogram (from the shards, else the manifest's bins)."""
    # matplotlib takes a second to import: only `inspect` draws, not every `oikyo` command
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    h = manifest.get("tokens", {}).get("histogram")
    lengths = _lengths(d)
    if lengths is not None and h:
        ax.hist([lengths[s] for s in SPLITS], bins=h["edges"], stacked=True, label=list(SPLITS))
    elif h:
        edges = h["edges"]
        bottom = [0] * (len(edges) - 1)
        for s in SPLITS:
            ax.bar(
                edges[:-1], h[s], width=[b - a for a, b in zip(edges, edges[1:])], bottom=bottom, align="edge", label=s
            )
            bottom = [a + b for a, b in zip(bottom, h[s])]
    ax.set_xlabel("tokens per example (after truncation)")
    ax.set_ylabel("examples")
    c = manifest["counts"]
    ax.set_title(f"token lengths: {c.get('train', 0)} train, {c.get('val', 0)} val, {c.get('test', 0)} test")
    ax.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
