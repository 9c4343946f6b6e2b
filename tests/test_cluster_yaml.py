"""Ray cluster-launcher configs under cluster/ (and the commands the docs give for them).

Each config is checked against the JSON schema that Ray's launcher itself uses
(site-packages/ray/autoscaler/ray-schema.json) plus oikyo's own rules: token auth on every
`ray start`, the dashboard on loopback only, the token shipped by file and never by value. No
cluster, SSH or cloud account is needed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
LITERAL_SECRET = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|\bhf_[A-Za-z0-9]{30,}")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def launcher_validator():
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json" if spec else None
    if not schema_path or not schema_path.is_file():
        pytest.skip("ray is not installed with its cluster-launcher schema (ray/autoscaler/ray-schema.json)")
    schema = json.loads(schema_path.read_text())
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, cfg: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    ]


def test_both_configs_present():
    assert {p.name for p in CONFIGS} >= {"local-multinode.yaml", "aws-gpu.yaml"}
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_matches_ray_launcher_schema(launcher_validator, path):
    assert schema_errors(launcher_validator, _load(path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_up_accepts_config(path):
    """What `ray up` does before touching a machine: fill provider defaults, then validate
    (schema + cross-field rules such as head_node_type and min/max workers). Private Ray API:
    skipped, not failed, if a Ray release moves it."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:
        pytest.skip(f"ray's launcher internals moved: {e}")
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c.pop("provider"), "provider"),
        (lambda c: c.__setitem__("max_workers", "four"), "max_workers"),
        (lambda c: c.__setitem__("head_start_ray_comands", []), "head_start_ray_comands"),
        (lambda c: c["auth"].__setitem__("ssh_password", "x"), "ssh_password"),
    ],
    ids=["missing-required-provider", "wrong-type", "unknown-key-typo", "unknown-auth-field"],
)
def test_launcher_schema_rejects_broken_config(launcher_validator, mutate, needle):
    cfg = copy.deepcopy(_load(CLUSTER / "aws-gpu.yaml"))
    mutate(cfg)
    errors = schema_errors(launcher_validator, cfg)
    assert errors and any(needle in e for e in errors), errors


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_required_launcher_keys(path):
    cfg = _load(path)
    assert re.fullmatch(r"[a-z][a-z0-9-]*", cfg["cluster_name"])
    assert cfg["provider"]["type"] and cfg["auth"]["ssh_user"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg[key][0] == "ray stop", f"{key}: stop a stale Ray first"


def ray_start_problems(cfg: dict) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key, []) if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no `ray start`")
        for cmd in starts:
            if "RAY_AUTH_MODE=token" not in cmd:
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
            if "--head" in cmd and "--dashboard-host=127.0.0.1" not in cmd:
                problems.append(f"{key}: the head must bind the dashboard to 127.0.0.1")
            if "0.0.0.0" in cmd:
                problems.append(f"{key}: binds a Ray port to every interface")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_token_auth_and_loopback_dashboard(path):
    cfg = _load(path)
    assert ray_start_problems(cfg) == []
    # the token travels as a file (by reference), never inline
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert not LITERAL_SECRET.search(path.read_text())
    assert "RAY_AUTH_TOKEN=" not in path.read_text()


def test_ray_start_check_catches_insecure_commands():
    cfg = copy.deepcopy(_load(CLUSTER / "aws-gpu.yaml"))
    cfg["head_start_ray_commands"] = ["ray stop", "ray start --head --dashboard-host=0.0.0.0"]
    assert len(ray_start_problems(cfg)) == 3


def test_local_config_runs_on_this_machine():
    cfg = _load(CLUSTER / "local-multinode.yaml")
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}


def test_aws_config_cpu_head_and_autoscaling_gpu_workers():
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert not re.match(r"[gp]\d", head["node_config"]["InstanceType"]), "head should be a CPU instance"
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    gpu = [t for t in workers if re.match(r"(g[4-6]|p[3-5])", t["node_config"]["InstanceType"])]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu), "autoscaling GPU group"
    assert sum(t["max_workers"] for t in workers) >= cfg["max_workers"]
    setup = " && ".join(cfg["setup_commands"])
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", (ROOT / "k8s" / "Dockerfile").read_text(), re.MULTILINE).group(
        1
    )
    assert f"=={ray_version}" in setup, "pin the Ray version the rest of the project uses"
    assert re.search(r"pip install[^&]*(~/oikyo\b|oikyo-ray)", setup), "setup must install oikyo"
    assert cfg["file_mounts"].get("~/oikyo") == ".", "ship the repo (run `ray up` from its root)"


# ------------------------------------------------------------------------------------ documentation
DOCS = [CLUSTER / "README.md", ROOT / "docs" / "cluster.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_name_real_files(doc):
    text = doc.read_text()
    named = set(re.findall(r"\b(?:cluster|k8s)/[\w.-]+\.ya?ml\b", text))
    if (ROOT / "jobs" / "finetune.py").is_file():
        named |= set(re.findall(r"\bjobs/[\w./-]+\.(?:py|yaml)\b", text))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def _commands(text: str) -> list[str]:
    """Shell lines of a markdown file, with backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(" ".join((cur + line).split()))
        cur = ""
    return out


def test_readme_has_the_multinode_recipe():
    lines = _commands((CLUSTER / "README.md").read_text())
    head = [ln for ln in lines if ln.startswith("ray start --head")]
    workers = [ln for ln in lines if ln.startswith("ray start --address")]
    assert head and all("--dashboard-host 127.0.0.1" in ln or "--dashboard-host=127.0.0.1" in ln for ln in head)
    assert workers and all("--num-cpus" in ln for ln in workers)
    assert "export RAY_AUTH_MODE=token" in lines
    submits = [ln for ln in lines if "ray job submit" in ln and " -- " in ln]
    assert any("--working-dir ." in ln for ln in submits)
    if (ROOT / "jobs" / "finetune.py").is_file():
        for ln in submits:  # the job command after `--` names a real script and config
            for tok in ln.split(" -- ", 1)[1].split():
                if tok.endswith((".py", ".yaml")):
                    assert (ROOT / tok).is_file(), f"{tok} does not exist"


# ------------------------------------------------------------------------------ security groups


def ssh_exposure_problems(cfg: dict) -> list[str]:
    """AWS: every node type must name its own SecurityGroupIds (else `ray up` creates a group that
    opens 22 to 0.0.0.0/0, and adds that rule to a provider.security_group too), and no rule in
    the file may open 22 to the world."""
    if cfg["provider"]["type"] != "aws":
        return []
    out = []
    if cfg["provider"].get("security_group") is not None:
        out.append("provider.security_group: the launcher adds 22 from 0.0.0.0/0 to it; use SecurityGroupIds")
    for name, nt in cfg["available_node_types"].items():
        if not nt.get("node_config", {}).get("SecurityGroupIds"):
            out.append(f"{name}: no node_config.SecurityGroupIds (the launcher's default opens SSH to 0.0.0.0/0)")

    def walk(node):
        if isinstance(node, dict):
            lo, hi = node.get("FromPort"), node.get("ToPort")
            if lo is not None and (lo == -1 or lo <= 22 <= (hi if hi is not None else lo)):
                cidrs = [r.get("CidrIp") for r in node.get("IpRanges", [])]
                cidrs += [r.get("CidrIpv6") for r in node.get("Ipv6Ranges", [])]
                if {"0.0.0.0/0", "::/0"} & set(cidrs):
                    out.append(f"a rule opens SSH (22) to the world: {node}")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cfg)
    return out


def test_aws_security_group_keeps_ssh_closed():
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    assert ssh_exposure_problems(cfg) == []
    readme = (CLUSTER / "README.md").read_text()
    assert "SecurityGroupIds" in readme and "0.0.0.0/0" in readme


def test_ssh_check_catches_open_security_group():
    cfg = _load(CLUSTER / "aws-gpu.yaml")
    broken = copy.deepcopy(cfg)
    del broken["available_node_types"]["worker.gpu"]["node_config"]["SecurityGroupIds"]
    assert any("worker.gpu" in p for p in ssh_exposure_problems(broken))
    broken = copy.deepcopy(cfg)
    broken["provider"]["security_group"] = {
        "GroupName": "x",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    }
    problems = ssh_exposure_problems(broken)
    assert any("provider.security_group" in p for p in problems) and any("to the world" in p for p in problems)
