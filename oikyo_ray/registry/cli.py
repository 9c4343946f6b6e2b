"""`oikyo registry list|show|register|alias`.

oikyo registry list [--root DIR|s3://...]
oikyo registry show MODEL [--root ...]
oikyo registry register MODEL RUN [--note TEXT] [--root ...]
oikyo registry alias MODEL ALIAS VERSION|--remove [--expect VERSION|none] [--root ...]
"""

from __future__ import annotations

import json

from oikyo_ray.errors import RegistryError
from oikyo_ray.registry import registry


def cmd_list(args) -> int:
    names = registry.list_models(args.root)
    if not names:
        print(f"no models registered under {args.root}")
        return 0
    print("model\tversions\taliases")
    for name in names:
        s = registry.load(args.root, name)
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(s.aliases.items()))
        print(f"{name}\t{len(s.versions)}\t{aliases}")
    return 0


def cmd_show(args) -> int:
    s = registry.load(args.root, args.model)
    if not s.history:
        raise RegistryError(f"no model {args.model!r} under {args.root}", hint="see `oikyo registry list`")
    print(f"# {s.name}\n\naliases: " + (", ".join(f"{a} -> v{v}" for a, v in sorted(s.aliases.items())) or "none"))
    for n, v in sorted(s.versions.items()):
        gates = "no eval" if v["eval"] is None else ("gates passed" if v["eval"]["passed"] else "gates FAILED")
        print(f"\nv{n}  {v['at']}  by {v['by']}  {gates}\n  run: {v['run']}\n  base: {v['base_model']}")
        if v.get("note"):
            print(f"  note: {v['note']}")
        for test in v["staging"]:
            verdict = "passed" if test["passed"] else "FAILED: " + "; ".join(test["misses"])
            print(f"  staging {test['at']}: {verdict}")
    traffic = ", ".join(f"{a} {w:g}" for a, w in sorted(s.traffic.items()))
    print(f"\ntraffic: {traffic}\n\nhistory:")
    for e in s.history:
        print(f"  {e['at']}  {e['by']}: {_what(e)}")
    return 0


def _what(e: dict) -> str:
    if e["kind"] == "version":
        return f"v{e['version']} registered"
    if e["kind"] == "traffic":
        return "traffic " + ", ".join(f"{a} {w:g}" for a, w in sorted(e["weights"].items()))
    if e["kind"] == "staging":
        return f"v{e['version']} staging test " + ("passed" if e["passed"] else "failed")
    return _move(e)


def _move(e: dict) -> str:
    prev = "unset" if e["previous"] is None else f"v{e['previous']}"
    return f"{e['alias']} {prev} -> " + ("removed" if e["version"] is None else f"v{e['version']}")


def cmd_register(args) -> int:
    entry = registry.register(args.root, args.model, args.run, note=args.note)
    print(f"[oikyo] {args.model} v{entry['version']} <- {entry['run']}")
    print(json.dumps({"model": args.model, "version": entry["version"], "eval": entry["eval"]}))
    return 0


def cmd_alias(args) -> int:
    expect = registry.AS_READ if args.expect is None else (None if args.expect == "none" else args.expect)
    if expect not in (registry.AS_READ, None):
        expect = registry.load(args.root, args.model).version(expect)["version"]
    ref = None if args.remove else args.version
    if ref is None and not args.remove:
        raise RegistryError("give a VERSION to point the alias at, or --remove")
    e = registry.set_alias(args.root, args.model, args.alias, ref, expect=expect)
    print(f"[oikyo] {args.model}: {_move(e)}")
    return 0


def add_registry_commands(sub) -> None:
    r = sub.add_parser("registry", help="named models: versions (runs' adapters) and aliases")
    rs = r.add_subparsers(dest="registry_cmd", required=True)

    def parser(name: str, help_: str):
        p = rs.add_parser(name, help=help_)
        p.add_argument("--root", default="runs", help="the run root holding registry/ (a directory or s3://...)")
        return p

    p = parser("list", "registered models with their version counts and aliases")
    p.set_defaults(fn=cmd_list)
    p = parser("show", "a model's versions, aliases and history")
    p.add_argument("model")
    p.set_defaults(fn=cmd_show)
    p = parser("register", "add a finished run's adapter as the model's next version")
    p.add_argument("model")
    p.add_argument("run", help="a run directory or s3:// run")
    p.add_argument("--note", help="free text kept with the version")
    p.set_defaults(fn=cmd_register)
    p = parser("alias", "point an alias (champion, challenger, ...) at a version, or remove it")
    p.add_argument("model")
    p.add_argument("alias")
    p.add_argument("version", nargs="?", help="v3, 3, another alias or 'latest'")
    p.add_argument("--remove", action="store_true", help="remove the alias")
    p.add_argument(
        "--expect",
        help="the version the alias points to now as you last saw it ('none': unset); if another "
        "writer moved it since, nothing is written",
    )
    p.set_defaults(fn=cmd_alias)
