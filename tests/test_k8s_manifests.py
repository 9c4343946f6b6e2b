"""The Kubernetes deliverables under k8s/: schema-valid, secure by default, pointing at real files.

No cluster is needed. ray.io/v1 kinds are validated against the OpenAPI v3 schema of the official
KubeRay CRDs in ../shared/kuberay-crds (strictly: an unknown field fails, as `kubectl apply` does
with server-side field validation); built-in kinds with `kubernetes-validate` when it is installed,
and with structural checks always. Negative cases show each validator rejects broken input.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
IMAGE_WORKDIR = "/app"  # the Dockerfile's WORKDIR: where the image holds this repository
SENSITIVE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
CONTROL_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray client
LITERAL_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub token
]


# ----------------------------------------------------------------------------------------- loading
def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


MANIFESTS = sorted(K8S.glob("*.yaml"))
DOCS = [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in MANIFESTS for d in _load(p)]
RAY_DOCS = [(i, d) for i, d in DOCS if d["apiVersion"] == "ray.io/v1"]
BUILTIN_DOCS = [(i, d) for i, d in DOCS if d["apiVersion"] != "ray.io/v1"]


def _docs(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for d in _docs(kind) if d["metadata"]["name"] == name]
    return doc


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs inside a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")], "RayService": [spec.get("rayClusterConfig")]}[
        doc["kind"]
    ]


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def _containers(doc: dict) -> list[dict]:
    return [c for cs in _cluster_specs(doc) for ps in _pod_specs(cs) for c in ps["containers"]]


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _repo_path(p: str) -> Path:
    """A path as the image sees it (relative to /app, or absolute under /app) -> the repo file."""
    if p.startswith(IMAGE_WORKDIR + "/"):
        p = p[len(IMAGE_WORKDIR) + 1 :]
    return ROOT / p


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    assert m, f"k8s/Dockerfile has no `ARG {name}=...`"
    return m.group(1)


# ---------------------------------------------------------------------------- CRD schema validation
def _strict(schema: dict) -> dict:
    """OpenAPI v3 (structural CRD schema) -> JSON Schema that rejects unknown fields."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@pytest.fixture(scope="session")
def crd_validators(shared_dir):
    jsonschema = pytest.importorskip("jsonschema")
    crd_dir = shared_dir / "kuberay-crds"
    validators = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML
    for f in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(f.read_text(encoding="utf-8"), Loader=loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = _strict(v1["schema"]["openAPIV3Schema"])
            validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert {"RayCluster", "RayJob", "RayService"} <= set(validators), f"CRDs missing in {crd_dir}"
    return validators


def crd_errors(validators, doc: dict) -> list[str]:
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    out = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    # KubeRay derives Service/Pod names from it (`<name>-head-svc`, `<name>-raycluster-xxxxx`)
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", name):
        out.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most 52 characters")
    return out


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=[i for i, _ in RAY_DOCS])
def test_ray_manifest_matches_kuberay_crd(crd_validators, doc):
    assert crd_errors(crd_validators, doc) == []


_DELETE = object()


def _set(doc, path, value):
    *parents, last = path
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


BROKEN = {  # mutation of k8s/raycluster.yaml -> a word the error must mention
    "wrong-type": (("spec", "workerGroupSpecs", 0, "maxReplicas"), "four", "maxReplicas"),
    "missing-required-headGroupSpec": (("spec", "headGroupSpec"), _DELETE, "headGroupSpec"),
    "missing-required-groupName": (("spec", "workerGroupSpecs", 0, "groupName"), _DELETE, "groupName"),
    "unknown-field-typo": (("spec", "enableInTreeAutoscalling"), True, "enableInTreeAutoscalling"),
    "bad-enum": (("spec", "authOptions", "mode"), "tokens", "tokens"),
    "bad-quantity": (
        ("spec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits", "memory"),
        "lots",
        "memory",
    ),
    "bad-name": (("metadata", "name"), "Oikyo_Cluster", "metadata.name"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_crd_validator_rejects_broken_manifest(crd_validators, case):
    path, value, needle = BROKEN[case]
    doc = copy.deepcopy(_one("RayCluster", "oikyo"))
    assert crd_errors(crd_validators, doc) == []
    _set(doc, path, value)
    errors = crd_errors(crd_validators, doc)
    assert errors, f"{case}: the validator accepted a broken manifest"
    assert any(needle in e for e in errors), errors


# ------------------------------------------------------------------------------------ built-in kinds
def structural_errors(doc: dict) -> list[str]:
    """Checks that hold without any schema package (and catch the usual hand-editing slips)."""
    errs = []
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if not isinstance(doc.get("metadata", {}).get("name"), str):
        errs.append("metadata.name missing")
    if kind == "NetworkPolicy":
        if not isinstance(spec.get("podSelector"), dict):
            errs.append("spec.podSelector must be a mapping")
        types = spec.get("policyTypes")
        if not isinstance(types, list) or not set(types) <= {"Ingress", "Egress"}:
            errs.append(f"spec.policyTypes must be a list of Ingress/Egress, got {types!r}")
        for rule in spec.get("ingress", []):
            if not isinstance(rule, dict) or not set(rule) <= {"from", "ports"}:
                errs.append(f"bad ingress rule {rule!r}")
                continue
            for port in rule.get("ports", []):
                if not isinstance(port.get("port"), (int, str)) or port.get("protocol", "TCP") not in (
                    "TCP",
                    "UDP",
                    "SCTP",
                ):
                    errs.append(f"bad port {port!r}")
            for peer in rule.get("from", []):
                if not set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}:
                    errs.append(f"bad peer {peer!r}")
    elif kind == "Secret":
        for key in ("data", "stringData"):
            if not all(isinstance(v, str) for v in doc.get(key, {}).values()):
                errs.append(f"{key} values must be strings")
    elif kind == "PersistentVolumeClaim":
        if not isinstance(spec.get("accessModes"), list):
            errs.append("spec.accessModes must be a list")
        if "storage" not in spec.get("resources", {}).get("requests", {}):
            errs.append("spec.resources.requests.storage missing")
    else:
        errs.append(f"no structural check for kind {kind}")
    return errs


def builtin_errors(doc: dict) -> list[str]:
    errs = structural_errors(doc)
    try:
        import kubernetes_validate
    except ImportError:
        return errs
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        errs.append(f"kubernetes-validate: {e.message} at {'.'.join(map(str, e.path))}")
    return errs


@pytest.mark.parametrize("doc", [d for _, d in BUILTIN_DOCS], ids=[i for i, _ in BUILTIN_DOCS])
def test_builtin_manifest_is_valid(doc):
    assert builtin_errors(doc) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].__setitem__("policyTypes", "Ingress"),
        lambda d: d["spec"]["ingress"][0].__setitem__("form", d["spec"]["ingress"][0].pop("from")),
    ],
    ids=["wrong-type", "unknown-field-typo"],
)
def test_builtin_validator_rejects_broken_networkpolicy(mutate):
    doc = copy.deepcopy(_one("NetworkPolicy", "oikyo-ray-pods"))
    mutate(doc)
    assert builtin_errors(doc)


# ------------------------------------------------------------------------------------ what they hold
def test_expected_manifests_present():
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in DOCS)
    for want in (
        "RayCluster/oikyo",
        "RayCluster/oikyo-ha",
        "RayJob/oikyo-finetune-demo",
        "RayService/oikyo-serve",
        "NetworkPolicy/oikyo-ray-pods",
        "NetworkPolicy/oikyo-ray-head-control",
        "PersistentVolumeClaim/oikyo-shared",
    ):
        assert want in kinds
    assert (K8S / "README.md").is_file() and (K8S / "Dockerfile").is_file()


def test_raycluster_autoscales_gpu_workers():
    spec = _one("RayCluster", "oikyo")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        assert g["maxReplicas"] > g["minReplicas"], f"group {g['groupName']} cannot scale"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "keep work off the head"


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=[i for i, _ in RAY_DOCS])
def test_groups_and_resources_are_consistent(doc):
    """What the CRD schema cannot say: replica bounds, and the limits Ray reads its resources from."""
    for cs in _cluster_specs(doc):
        for g in cs.get("workerGroupSpecs", []):
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for c in _containers(doc):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["limits"]), f"{c['name']}: set cpu and memory limits"
        assert res["requests"] == res["limits"], f"{c['name']}: requests must equal limits"


def test_rayjob_cleans_up_after_itself():
    spec = _one("RayJob", "oikyo-finetune-demo")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["backoffLimit"], int)
    assert spec.get("activeDeadlineSeconds", 0) > 0


def test_one_image_and_versions_everywhere():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)
    ray_version = _dockerfile_arg("RAY_VERSION")
    images = {c["image"] for _, d in RAY_DOCS for c in _containers(d)}
    assert images == {f"ghcr.io/oikyo/oikyo-ray:{version}"}
    assert {cs["rayVersion"] for _, d in RAY_DOCS for cs in _cluster_specs(d)} == {ray_version}
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", (K8S / "Dockerfile").read_text(), re.MULTILINE)


def test_shared_volume_claims_exist():
    pvcs = {d["metadata"]["name"] for d in _docs("PersistentVolumeClaim")}
    for _, doc in RAY_DOCS:
        for cs in _cluster_specs(doc):
            for ps in _pod_specs(cs):
                claims = {
                    v["persistentVolumeClaim"]["claimName"]
                    for v in ps.get("volumes", [])
                    if "persistentVolumeClaim" in v
                }
                assert claims <= pvcs, f"{doc['metadata']['name']}: unknown PVC {claims - pvcs}"


# ------------------------------------------------------------------------------------------ security
@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=[i for i, _ in RAY_DOCS])
def test_token_auth_and_no_public_services(doc):
    for cs in _cluster_specs(doc):
        assert cs["authOptions"]["mode"] == "token"
        head = cs["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)
    serve_svc = doc["spec"].get("serveService", {}).get("spec", {})
    assert serve_svc.get("type", "ClusterIP") == "ClusterIP"


def secret_problems(doc: dict) -> list[str]:
    """Literal credentials in a manifest: sensitive env vars must be secretKeyRef, nothing in
    runtime envs, no credential-looking strings anywhere."""
    problems = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "env" and isinstance(v, list):
                    for e in v:
                        if SENSITIVE.search(e.get("name", "")) and "secretKeyRef" not in e.get("valueFrom", {}):
                            problems.append(f"{path}.env {e.get('name')}: use valueFrom.secretKeyRef")
                if k in ("redisPassword", "redisUsername") and "value" in v:
                    problems.append(f"{path}.{k}: use valueFrom.secretKeyRef")
                if k == "rayStartParams":
                    for param, val in v.items():
                        if SENSITIVE.search(param) and not str(val).startswith("$"):
                            problems.append(f"{path}.rayStartParams.{param}: literal value")
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, doc["kind"])
    runtime_envs = []
    if doc["kind"] == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
        runtime_envs.append(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {})
    if doc["kind"] == "RayService":
        runtime_envs += [a.get("runtime_env") or {} for a in _serve_config(doc).get("applications", [])]
    for env in runtime_envs:
        for name in env.get("env_vars") or {}:
            if SENSITIVE.search(name):
                problems.append(f"runtime_env env_vars {name}: runtime envs are not secret; use a Secret")
    text = yaml.safe_dump(doc)
    problems += [f"credential-looking string /{p.pattern}/" for p in LITERAL_SECRET_PATTERNS if p.search(text)]
    return problems


@pytest.mark.parametrize(
    "doc", [d for i, d in DOCS if d["kind"] != "Secret"], ids=[i for i, d in DOCS if d["kind"] != "Secret"]
)
def test_no_literal_secrets(doc):
    assert secret_problems(doc) == []


def test_secret_check_catches_literals():
    doc = copy.deepcopy(_one("RayJob", "oikyo-finetune-demo"))
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "plain-text"}]
    doc["spec"]["runtimeEnvYAML"] = "env_vars:\n  HF_TOKEN: abc\n"
    doc["metadata"]["annotations"] = {"note": "AKIA" + "ABCDEFGHIJKLMNOP"}
    problems = secret_problems(doc)
    assert len(problems) == 3, problems


def test_secrets_example_is_fake_and_complete():
    secrets = {d["metadata"]["name"]: d for d in _docs("Secret")}
    for name, s in secrets.items():
        assert "data" not in s, f"{name}: use stringData placeholders, not base64 data"
        for key, val in s["stringData"].items():
            assert "REPLACE_ME" in val or ".invalid" in val, f"{name}.{key} does not look fake"
    # every Secret a manifest references is documented there, with the key it reads
    for _, doc in RAY_DOCS:
        refs = []
        for cs in _cluster_specs(doc):
            refs.append((cs["authOptions"]["secretName"], "auth_token"))
            refs += [(r["name"], r["key"]) for r in _find(cs, "secretKeyRef")]
        for name, key in refs:
            assert name in secrets and key in secrets[name]["stringData"], f"{name}/{key} undocumented"


def _find(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def test_networkpolicy_keeps_control_plane_in_cluster():
    policies = _docs("NetworkPolicy")
    for np in policies:
        spec = np["spec"]
        assert spec["podSelector"]["matchLabels"].get("ray.io/is-ray-node") == "yes"
        assert "Ingress" in spec["policyTypes"]
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{np['metadata']['name']}: a rule without `from` admits every source"
            assert not any("ipBlock" in p for p in peers), "no ipBlock: keep the cluster private"
            ports = {p["port"] for p in rule.get("ports", [])}
            if not ports or ports & CONTROL_PORTS:  # all ports, or a control-plane port
                for p in peers:
                    assert p.get("podSelector", {}).get("matchLabels"), (
                        f"{np['metadata']['name']}: control ports open to a whole namespace: {p}"
                    )
    head = [np for np in policies if np["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"]
    operator_to_dashboard = [
        r
        for np in head
        for r in np["spec"]["ingress"]
        if 8265 in {p["port"] for p in r.get("ports", [])}
        and any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "kuberay-operator"
            for p in r["from"]
        )
    ]
    assert operator_to_dashboard, "the KubeRay operator must reach the head's dashboard (8265)"


# ------------------------------------------------------------------------- entrypoints and Serve app
def entrypoint_problems(entrypoint: str) -> list[str]:
    """The script and --config exist in the repo and the overrides are valid oikyo config keys."""
    from oikyo_ray.config import load_config
    from oikyo_ray.errors import ConfigError

    tokens = shlex.split(entrypoint)
    scripts = [t for t in tokens if t.endswith(".py")]
    if tokens[:1] != ["python"] or not scripts:
        return [f"entrypoint must be `python <script>.py ...`: {entrypoint!r}"]
    problems = [] if _repo_path(scripts[0]).is_file() else [f"{scripts[0]} is not in the repo"]
    if "--config" not in tokens:
        return problems + ["no --config"]
    config = _repo_path(tokens[tokens.index("--config") + 1])
    if not config.is_file():
        return problems + [f"--config {config.relative_to(ROOT)} is not in the repo"]
    rest = tokens[tokens.index(scripts[0]) + 1 :]
    overrides = [t for t in rest if "=" in t and not t.startswith("-")]
    try:
        load_config(config, overrides)
    except ConfigError as e:
        problems.append(str(e))
    return problems


needs_jobs = pytest.mark.skipif(
    not (ROOT / "jobs" / "finetune.py").is_file(), reason="jobs/finetune.py is not written yet"
)


@needs_jobs
def test_rayjob_entrypoint_names_real_files_and_valid_overrides():
    for doc in _docs("RayJob"):
        assert entrypoint_problems(doc["spec"]["entrypoint"]) == []


@needs_jobs
def test_entrypoint_check_catches_mistakes():
    assert entrypoint_problems("python jobs/nope.py --config jobs/configs/demo.yaml")
    assert entrypoint_problems("python jobs/finetune.py --config jobs/configs/nope.yaml")
    assert entrypoint_problems("python jobs/finetune.py --config jobs/configs/demo.yaml scaling.gpus=2")


def test_serve_config_v2_is_a_valid_serve_deploy_config():
    schema = pytest.importorskip("ray.serve.schema")
    for doc in _docs("RayService"):
        cfg = _serve_config(doc)
        parsed = schema.ServeDeploySchema.model_validate(cfg)
        serve_ports = {
            p["containerPort"] for c in _containers(doc) for p in c.get("ports", []) if p.get("name") == "serve"
        }
        assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port in serve_ports
        for app in cfg["applications"]:
            runtime_env = app.get("runtime_env") or {}
            assert "working_dir" not in runtime_env and "py_modules" not in runtime_env, (
                "Serve configs cannot ship local code: install oikyo in the image"
            )
            module, _, attr = app["import_path"].partition(":")
            source = ROOT / (module.replace(".", "/") + ".py")
            assert source.is_file(), f"{module} is not in the repo"
            defs = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert attr in defs, f"{app['import_path']}: no function {attr}"


def test_serve_schema_rejects_broken_config():
    schema = pytest.importorskip("ray.serve.schema")
    cfg = _serve_config(_one("RayService", "oikyo-serve"))
    cfg["applications"][0]["runtime_env"] = {"working_dir": "."}  # local dirs are not allowed
    with pytest.raises(Exception, match="working_dir"):
        schema.ServeDeploySchema.model_validate(cfg)


def test_serve_app_args_point_at_a_valid_oikyo_config():
    from oikyo_ray.config import load_config

    for doc in _docs("RayService"):
        for app in _serve_config(doc)["applications"]:
            args = app["args"]
            assert _repo_path(args["config"]).is_file(), f"{args['config']} is not in the repo"
            assert args["config"].startswith(IMAGE_WORKDIR + "/"), "use the image's absolute path"
            cfg = load_config(_repo_path(args["config"]), args.get("overrides") or [])
            assert cfg.serve.auth, "the served endpoint must require its bearer token"
            assert any(e["name"] == cfg.serve.token_env for c in _containers(doc) for e in c["env"])


def test_readme_commands_name_real_files():
    text = (K8S / "README.md").read_text()
    for path in sorted(set(re.findall(r"\bk8s/[\w.-]+\.ya?ml\b|\bjobs/[\w./-]+\.(?:py|yaml)\b", text))):
        assert (ROOT / path).is_file(), f"k8s/README.md names {path}, which does not exist"
