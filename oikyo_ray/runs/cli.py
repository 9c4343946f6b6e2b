"""`oikyo runs list|show|compare|export`.

oikyo runs list [--root DIR|s3://...]
oikyo runs show RUN
oikyo runs compare RUN_A RUN_B [...] [--out compare.md]
oikyo runs export RUN --out DIR [--merge] [--format gguf [--quant f16|q8_0]]
"""

from __future__ import annotations

import json
from pathlib import Path

from oikyo_ray.errors import OikyoError
from oikyo_ray.runs.compare import compare_runs, format_comparison
from oikyo_ray.runs.rundir import list_runs
from oikyo_ray.runs.store import join, read_text, run_name


def cmd_list(args) -> int:
    rows = list_runs(args.root)
    if not rows:
        print(f"no runs under {args.root}")
        return 0
    cols = ["run", "base_model", "data", "base_em", "tuned_em", "tuned_loss"]
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    return 0


def cmd_show(args) -> int:
    read = lambda name: read_text(join(args.run, name))  # noqa: E731  (local dir or s3:// run)
    config = read("config.yaml")
    if config is None:
        raise OikyoError(f"{args.run} is not a run directory (no config.yaml)")
    print(f"# {run_name(args.run)}\n\n## config\n{config}")
    for name in ("lineage.json", "data/manifest.json"):
        if (text := read(name)) is not None:
            info = json.loads(text)
            print(f"## {name}\n{json.dumps({k: v for k, v in info.items() if k != 'data_config'}, indent=2)}\n")
    lines = (read("metrics.jsonl") or "").splitlines()
    if lines:
        print(f"## metrics ({len(lines)} reports), last:\n{lines[-1]}\n")
    if (report := read("eval/report.md")) is not None:
        print(report)
    return 0


def cmd_compare(args) -> int:
    text = format_comparison(compare_runs(args.runs))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_export(args) -> int:
    # export loads peft and the model stack (seconds): only this command pays for it, not every
    # `oikyo` command that builds this parser
    from oikyo_ray.runs.export import export_run  # noqa: PLC0415

    out = export_run(args.run, args.out, merge=args.merge, fmt=args.format, quant=args.quant)
    what = "GGUF + Ollama Modelfile" if args.format == "gguf" else "merged model" if args.merge else "adapter"
    print(f"[oikyo] exported {what} to {out}")
    return 0


def add_runs_commands(sub) -> None:
    r = sub.add_parser("runs", help="list, show, compare and export runs")
    rs = r.add_subparsers(dest="runs_cmd", required=True)
    p = rs.add_parser("list", help="runs under a root, newest first, with headline metrics")
    p.add_argument("--root", default="runs", help="a directory or s3://bucket/prefix")
    p.set_defaults(fn=cmd_list)
    p = rs.add_parser("show", help="a run's config, lineage, data manifest, metrics and report")
    p.add_argument("run", help="a run directory or s3://bucket/prefix/<run>")
    p.set_defaults(fn=cmd_show)
    p = rs.add_parser("compare", help="several runs' evaluation reports side by side")
    p.add_argument("runs", nargs="+", help="run directories or s3:// runs")
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.set_defaults(fn=cmd_compare)
    p = rs.add_parser("export", help="package a run's adapter (or merged model) with tokenizer and model card")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="new directory to write")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument(
        "--format",
        choices=["safetensors", "gguf"],
        default="safetensors",
        help="gguf: one merged GGUF file for llama.cpp/Ollama, with an Ollama Modelfile",
    )
    p.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="GGUF tensor type (with --format gguf)")
    p.set_defaults(fn=cmd_export)
