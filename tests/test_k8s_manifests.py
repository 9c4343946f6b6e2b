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


def _pod_labels(doc: dict) -> list[dict]:
    groups = [g for cs in _cluster_specs(doc) for g in (cs["headGroupSpec"], *cs.get("workerGroupSpecs", []))]
    return [g["template"].get("metadata", {}).get("labels", {}) for g in groups]


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
    elif kind == "CronJob":
        if not isinstance(spec.get("schedule"), str) or len(spec["schedule"].split()) != 5:
            errs.append(f"spec.schedule must be a 5-field cron string, got {spec.get('schedule')!r}")
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            errs.append("a Job's pod needs restartPolicy Never or OnFailure")
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
        "RayJob/oikyo-deploy-demo",
        "RayJob/oikyo-retrain-demo",
        "CronJob/oikyo-retrain-nightly",
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


@pytest.mark.parametrize("name", ["oikyo-finetune-demo", "oikyo-deploy-demo", "oikyo-retrain-demo"])
def test_rayjob_cleans_up_after_itself(name):
    spec = _one("RayJob", name)["spec"]
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
        assert "Ingress" in spec["policyTypes"] or spec.get("egress"), f"{np['metadata']['name']}: no rules"
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


def _deploy_job_argv(entrypoint: str) -> list[str]:
    """The `oikyo deploy` command line jobs/deploy.py runs for a RayJob's entrypoint."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_job", ROOT / "jobs" / "deploy.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.deploy_argv(job.parse(shlex.split(entrypoint)[2:]))


def deploy_update_path_problems(job: dict, service: dict) -> list[str]:
    """A deploy RayJob moves what the RayService serves: the same oikyo config, the registry under
    the run root the app reads, a model the app answers, and a staging replica of the prod shape."""
    from oikyo_ray.cli import parse_args
    from oikyo_ray.config import load_config

    args = parse_args(_deploy_job_argv(job["spec"]["entrypoint"]))
    (app,) = _serve_config(service)["applications"]
    served = load_config(_repo_path(app["args"]["config"]), app["args"].get("overrides") or [])
    staged = load_config(_repo_path(args.config), args.overrides)
    out = []
    if _repo_path(args.config) != _repo_path(app["args"]["config"]):
        out.append(f"--config {args.config} is not the RayService's config {app['args']['config']}")
    if staged.run.root != served.run.root:
        out.append(f"run.root {staged.run.root} is not the RayService's {served.run.root}: it would not see the move")
    if args.model not in served.serve.registry_models:
        out.append(f"--model {args.model} is not in the RayService's serve.registry_models")
    if not args.run.startswith(served.run.root + "/"):
        out.append(f"--run-dir {args.run} is not under the shared run root {served.run.root}")
    shape = lambda d: [c["resources"] for c in _containers(d) if c["name"] == "ray-worker"]  # noqa: E731
    if shape(job) and shape(service) and shape(job)[0] != shape(service)[0]:
        out.append("the staging worker's resources differ from the RayService's serve workers")
    return out


def test_deploy_rayjob_moves_what_the_rayservice_serves():
    assert deploy_update_path_problems(_one("RayJob", "oikyo-deploy-demo"), _one("RayService", "oikyo-serve")) == []


def test_deploy_update_path_check_catches_mistakes():
    job, service = _one("RayJob", "oikyo-deploy-demo"), _one("RayService", "oikyo-serve")
    wrong_root = copy.deepcopy(job)
    wrong_root["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("run.root=/mnt/oikyo/runs", "run.root=/tmp/r")
    assert any("run.root /tmp/r" in p for p in deploy_update_path_problems(wrong_root, service))
    wrong_model = copy.deepcopy(job)
    wrong_model["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("--model support-bot", "--model other")
    assert any("--model other" in p for p in deploy_update_path_problems(wrong_model, service))
    small = copy.deepcopy(job)
    small["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": "1"}
    }
    assert any("staging worker" in p for p in deploy_update_path_problems(small, service))


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


# ------------------------------------------------------------------ Pod Security Standard "restricted"


def _image_user() -> tuple[int, int]:
    """The numeric `USER uid:gid` the Dockerfile ends with (the user every pod must run as)."""
    users = re.findall(r"^USER\s+(\S+)\s*$", (K8S / "Dockerfile").read_text(), re.M)
    assert users, "k8s/Dockerfile sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {users[-1]}: use numeric uid:gid (runAsNonRoot needs it)"
    return int(uid), int(gid)


def test_image_runs_as_non_root_user():
    uid, _ = _image_user()
    assert uid != 0


def pod_templates(node, where: str = "", needs_api: bool = False):
    """Every pod spec (a dict with `containers`) anywhere in a manifest, with whether it needs the
    Kubernetes API: the head of a cluster with the in-tree autoscaler, whose sidecar calls it."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node, needs_api
            return
        for k, v in node.items():
            head_api = k == "headGroupSpec" and bool(node.get("enableInTreeAutoscaling"))
            yield from pod_templates(v, f"{where}.{k}", needs_api or head_api)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from pod_templates(v, f"{where}[{i}]", needs_api)


POD_TEMPLATES = [(f"{i}{w}", ps, api) for i, d in DOCS for w, ps, api in pod_templates(d)]
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def restricted_problems(pod: dict, needs_api: bool) -> list[str]:
    uid, gid = _image_user()
    out = []
    psc = pod.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        out.append("pod: runAsNonRoot must be true")
    if psc.get("runAsUser") != uid:
        out.append(f"pod: runAsUser must be {uid} (the image's user)")
    if psc.get("runAsGroup", gid) != gid:
        out.append(f"pod: runAsGroup must be {gid}")
    if needs_api:
        if pod.get("automountServiceAccountToken") is False:
            out.append("autoscaling head: the autoscaler sidecar needs its ServiceAccount token")
    elif pod.get("automountServiceAccountToken") is not False:
        out.append("automountServiceAccountToken must be false (the pod does not use the API)")
    emptydirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext") or {}
        name = c.get("name")
        for k, want in RESTRICTED_CONTAINER.items():
            if sc.get(k) is not want:
                out.append(f"{name}: {k} must be {want}")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("runAsUser", uid) in (0, None) or sc.get("runAsUser", uid) != uid:
            out.append(f"{name}: runAsUser must be {uid}")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if (sc.get("capabilities") or {}).get("add"):
            out.append(f"{name}: adds capabilities")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            out.append(f"{name}: seccompProfile must be RuntimeDefault")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        wanted = ["/tmp", "/home/ray/.cache"] + (["/tmp/ray"] if name in ("ray-head", "ray-worker") else [])
        for path in wanted:  # readOnlyRootFilesystem: where Ray, pip and torch write
            if mounts.get(path) not in emptydirs:
                out.append(f"{name}: {path} must be a writable emptyDir")
    return out


def test_every_manifest_pod_template_is_found():
    per_doc = {i: len(list(pod_templates(d))) for i, d in DOCS}
    assert len(POD_TEMPLATES) == sum(per_doc.values())
    for i, d in RAY_DOCS:  # head + worker groups (+ the RayJob's submitter pod)
        expected = sum(1 + len(cs.get("workerGroupSpecs", [])) for cs in _cluster_specs(d))
        expected += "submitterPodTemplate" in d["spec"]
        assert per_doc.get(i) == expected, i
    assert "submitterPodTemplate" in _one("RayJob", "oikyo-finetune-demo")["spec"]


@pytest.mark.parametrize("where,pod,needs_api", POD_TEMPLATES, ids=[w for w, _, _ in POD_TEMPLATES])
def test_pod_template_meets_restricted_pss(where, pod, needs_api):
    assert restricted_problems(pod, needs_api) == []


def _head_pod(doc):
    return doc["spec"]["headGroupSpec"]["template"]["spec"]


def _worker_pod(doc):
    return doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]


RESTRICTED_BREAKS = {  # mutation of raycluster.yaml's pods -> a word the problem must mention
    "root": (lambda d: _worker_pod(d)["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    "uid0": (lambda d: _worker_pod(d)["securityContext"].update(runAsUser=0), "runAsUser"),
    "escalation": (
        lambda d: _worker_pod(d)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
    ),
    "caps": (lambda d: _head_pod(d)["containers"][0]["securityContext"].pop("capabilities"), "drop ALL"),
    "rw-root": (
        lambda d: _head_pod(d)["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "seccomp": (
        lambda d: (
            _worker_pod(d)["securityContext"].pop("seccompProfile"),
            _worker_pod(d)["containers"][0]["securityContext"].pop("seccompProfile"),
        ),
        "seccompProfile",
    ),
    "no-tmp-ray": (
        lambda d: _worker_pod(d).update(volumes=[v for v in _worker_pod(d)["volumes"] if v["name"] != "ray-logs"]),
        "/tmp/ray",
    ),
    "worker-token": (lambda d: _worker_pod(d).pop("automountServiceAccountToken"), "automountServiceAccountToken"),
    "head-no-token": (lambda d: _head_pod(d).update(automountServiceAccountToken=False), "autoscaler"),
}


@pytest.mark.parametrize("case", sorted(RESTRICTED_BREAKS))
def test_restricted_check_catches_mistakes(case):
    doc = copy.deepcopy(_one("RayCluster", "oikyo"))
    mutate, word = RESTRICTED_BREAKS[case]
    mutate(doc)
    problems = [p for _, ps, api in pod_templates(doc) for p in restricted_problems(ps, api)]
    assert any(word in p for p in problems), problems


def test_head_without_autoscaler_does_not_mount_token():
    doc = copy.deepcopy(_one("RayCluster", "oikyo"))
    doc["spec"]["enableInTreeAutoscaling"] = False
    problems = [p for _, ps, api in pod_templates(doc) for p in restricted_problems(ps, api)]
    assert any("automountServiceAccountToken must be false" in p for p in problems)


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=[i for i, _ in RAY_DOCS])
def test_autoscaler_sidecar_is_locked_down(doc):
    for cs in _cluster_specs(doc):
        if not cs.get("enableInTreeAutoscaling"):
            continue
        sc = cs.get("autoscalerOptions", {}).get("securityContext") or {}
        for k, want in RESTRICTED_CONTAINER.items():
            assert sc.get(k) is want, f"autoscalerOptions.securityContext.{k} must be {want}"
        assert "ALL" in sc.get("capabilities", {}).get("drop", [])
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        head_emptydirs = {v["name"] for v in cs["headGroupSpec"]["template"]["spec"]["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in cs["autoscalerOptions"].get("volumeMounts", [])}
        assert mounts.get("/tmp") in head_emptydirs, "read-only root: the autoscaler needs a writable /tmp"


def test_namespace_enforces_restricted_pss():
    namespaces = _docs("Namespace")
    for ns in namespaces:
        assert ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted"
    if not namespaces:
        readme = (K8S / "README.md").read_text()
        assert "pod-security.kubernetes.io/enforce=restricted" in readme


# --------------------------------------------------------------------------------- egress policies

METADATA_ADDRESSES = ["169.254.169.254", "fd00:ec2::254"]
SERVE_CLIENT_LABEL = "oikyo.io/serve-client"


def egress_problems(policies: list[dict]) -> list[str]:
    import ipaddress

    out = []
    egress = [np for np in policies if "Egress" in np["spec"].get("policyTypes", [])]
    ray = [np for np in egress if np["spec"]["podSelector"].get("matchLabels", {}).get("ray.io/is-ray-node") == "yes"]
    if not ray:
        return ["no Egress policy selects the Ray pods"]
    ports = set()
    for np in egress:
        for rule in np["spec"].get("egress", []):
            if not rule.get("to"):
                out.append(f"{np['metadata']['name']}: an egress rule without `to` allows every address")
            ports |= {p["port"] for p in rule.get("ports", [])} or {"*"}
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if not block:
                    continue
                net = ipaddress.ip_network(block["cidr"])
                excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
                for addr in map(ipaddress.ip_address, METADATA_ADDRESSES):
                    if addr.version == net.version and addr in net and not any(addr in e for e in excepted):
                        out.append(f"{np['metadata']['name']}: {block['cidr']} reaches the metadata address {addr}")
    for need in (53, 443):
        if need not in ports and "*" not in ports:
            out.append(f"egress to port {need} is not allowed")
    return out


def test_egress_keeps_pods_off_the_metadata_service():
    assert egress_problems(_docs("NetworkPolicy")) == []


def test_egress_check_catches_mistakes():
    policies = copy.deepcopy(_docs("NetworkPolicy"))
    (egress,) = [np for np in policies if "Egress" in np["spec"]["policyTypes"]]
    for rule in egress["spec"]["egress"]:
        for peer in rule.get("to", []):
            peer.get("ipBlock", {}).pop("except", None)
    problems = egress_problems(policies)
    assert any("169.254.169.254" in p for p in problems) and any("fd00:ec2::254" in p for p in problems)
    egress["spec"]["egress"].append({})
    assert any("without `to`" in p for p in egress_problems(policies))
    assert egress_problems([np for np in policies if np is not egress]) == ["no Egress policy selects the Ray pods"]


def serve_port_problems(policies: list[dict]) -> list[str]:
    out = []
    for np in policies:
        for rule in np["spec"].get("ingress", []):
            if 8000 not in {p["port"] for p in rule.get("ports", [])}:
                continue
            for peer in rule["from"]:
                ns = peer.get("namespaceSelector")
                if ns is not None and ns.get("matchLabels", {}).get(SERVE_CLIENT_LABEL) != "true":
                    out.append(f"{np['metadata']['name']}: 8000 open to namespaces without {SERVE_CLIENT_LABEL}")
                if "ipBlock" in peer:
                    out.append(f"{np['metadata']['name']}: 8000 open to an ipBlock")
    return out


def test_serve_port_open_only_to_labelled_namespaces():
    assert serve_port_problems(_docs("NetworkPolicy")) == []
    assert SERVE_CLIENT_LABEL in (K8S / "README.md").read_text(), "document the namespace label"


def test_serve_port_check_catches_open_namespace():
    policies = copy.deepcopy(_docs("NetworkPolicy"))
    for np in policies:
        for rule in np["spec"].get("ingress", []):
            for peer in rule["from"]:
                if "namespaceSelector" in peer and 8000 in {p["port"] for p in rule.get("ports", [])}:
                    peer["namespaceSelector"] = {}
    assert serve_port_problems(policies)


# ----------------------------------------------------------------------- Serve deployment names


def _app_deployments(import_path: str) -> set[str]:
    """Import the application builder of `import_path` and collect the names of the module's
    Serve deployments (@serve.deployment(name=...)). Importing starts no Ray cluster."""
    import importlib

    serve = pytest.importorskip("ray.serve")
    module_name, _, attr = import_path.partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr, None)), f"{import_path} does not resolve"
    return {v.name for v in vars(module).values() if isinstance(v, serve.Deployment)}


def _serve_configs() -> list[tuple[str, dict]]:
    configs = [(f"k8s:{d['metadata']['name']}", _serve_config(d)) for d in _docs("RayService")]
    for p in sorted((ROOT / "serve").glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text())
        if isinstance(cfg, dict) and "applications" in cfg:
            configs.append((f"serve/{p.name}", cfg))
    return configs


def deployment_problems(cfg: dict) -> list[str]:
    out = []
    for app in cfg["applications"]:
        real = _app_deployments(app["import_path"])
        for dep in app.get("deployments", []):
            if dep["name"] not in real:
                out.append(f"{app['name']}: deployment {dep['name']!r} is not one of {sorted(real)}")
    return out


def test_serve_configs_name_real_deployments():
    configs = _serve_configs()
    assert any(n.startswith("serve/") for n, _ in configs) and any(n.startswith("k8s:") for n, _ in configs)
    for name, cfg in configs:
        assert deployment_problems(cfg) == [], name
    assert _app_deployments("oikyo_ray.serve.ray_serve:build_app") >= {"Model", "OpenAIIngress"}
    rayservice = _serve_config(_one("RayService", "oikyo-serve"))
    assert {d["name"] for d in rayservice["applications"][0]["deployments"]} == {"Model", "OpenAIIngress"}


def test_deployment_check_catches_unknown_name():
    cfg = copy.deepcopy(_serve_config(_one("RayService", "oikyo-serve")))
    cfg["applications"][0]["deployments"][0]["name"] = "OpenAIServer"
    assert any("OpenAIServer" in p for p in deployment_problems(cfg))
    cfg["applications"][0]["import_path"] = "oikyo_ray.serve.ray_serve:no_such_builder"
    with pytest.raises(AssertionError, match="does not resolve"):
        deployment_problems(cfg)


def _retrain_job_args(entrypoint: str):
    """The `oikyo retrain` arguments jobs/retrain.py runs for an entrypoint."""
    import importlib.util

    from oikyo_ray.cli import parse_args

    spec = importlib.util.spec_from_file_location("retrain_job", ROOT / "jobs" / "retrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return parse_args(job.retrain_argv(job.parse(shlex.split(entrypoint)[2:])))


def test_retrain_job_and_schedule_retrain_what_the_rayservice_serves():
    """The RayJob and the nightly CronJob run jobs/retrain.py for a model the RayService serves,
    on its config and run root (where its registry and capture are); the schedule's pod reaches
    the head's Jobs API through the NetworkPolicy, with the cluster token from its Secret."""
    from oikyo_ray.config import load_config

    cron = _one("CronJob", "oikyo-retrain-nightly")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"][:4] == ["ray", "job", "submit", "--address"] and c["command"][-1] == "--"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    token = [e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"]["name"] == "oikyo-ray-auth"
    (app,) = _serve_config(_one("RayService", "oikyo-serve"))["applications"]
    served = load_config(_repo_path(app["args"]["config"]), app["args"].get("overrides") or [])
    for entrypoint in (shlex.join(c["args"]), _one("RayJob", "oikyo-retrain-demo")["spec"]["entrypoint"]):
        assert entrypoint_problems(entrypoint) == []
        args = _retrain_job_args(entrypoint)
        assert args.cmd == "retrain" and args.model in served.serve.registry_models
        assert load_config(_repo_path(args.config), args.overrides).run.root == served.run.root
    label = pod["metadata"]["labels"]["app.kubernetes.io/component"]
    head = _one("NetworkPolicy", "oikyo-ray-head-control")["spec"]["ingress"]
    admitted = [
        r
        for r in head
        if 8265 in {p["port"] for p in r["ports"]}
        and any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == label
            for p in r["from"]
        )
    ]
    assert admitted, "the retrain schedule's pod cannot reach the Jobs API"
