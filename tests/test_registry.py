"""The model registry: versions and aliases on local disk and on a real S3 server (moto), racing
writers, bad names and hand-edited logs; and the `oikyo registry` commands."""

import json
import threading
import uuid

import boto3
import pytest

from oikyo_ray.cli import main
from oikyo_ray.errors import RegistryConflict, RegistryError
from oikyo_ray.registry import registry
from oikyo_ray.registry.log import entry_name


def _run(tmp_path, name: str, passed: bool = True):
    """A finished run's layout as the registry reads it (the adapter's weights are not read)."""
    run = tmp_path / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "eval").mkdir()
    (run / "lineage.json").write_text(json.dumps({"base_model": "oikyo-demo-tiny", "data_content_hash": "abc"}))
    gates = [{"name": "tuned:exact_match", "passed": passed}]
    report = {"passed": passed, "gates": gates, "tuned": {"exact_match": 0.5, "loss": 1.2, "n": 10}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return str(run)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("s3_server")
    bucket = f"reg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


def test_versions_and_aliases_round_trip(root, tmp_path):
    a, b = _run(tmp_path, "run-a"), _run(tmp_path, "run-b", passed=False)
    v1 = registry.register(root, "support-bot", a, note="first")
    v2 = registry.register(root, "support-bot", b)
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["adapter"] == f"{a}/adapter" and v1["eval"]["passed"] and v1["note"] == "first"
    assert v2["eval"] == {"passed": False, "failed_gates": ["tuned:exact_match"], "tuned": v2["eval"]["tuned"]}
    assert registry.set_alias(root, "support-bot", "champion", "v1")["previous"] is None
    registry.set_alias(root, "support-bot", "challenger", "latest")
    moved = registry.set_alias(root, "support-bot", "champion", 2, expect=1)
    assert (moved["previous"], moved["version"]) == (1, 2)
    registry.set_alias(root, "support-bot", "champion", "v1")  # rollback: one more move
    registry.set_alias(root, "support-bot", "challenger", None)
    s = registry.load(root, "support-bot")
    assert s.aliases == {"champion": 1} and s.version("champion")["run"] == a and s.version("2")["run"] == b
    assert [e["kind"] for e in s.history] == ["version", "version", "alias", "alias", "alias", "alias", "alias"]
    assert registry.list_models(root) == ["support-bot"]


def test_racing_registrations_all_land_with_distinct_numbers(root, tmp_path):
    runs = [_run(tmp_path, f"run-{i}") for i in range(6)]
    start, got, failed = threading.Barrier(len(runs)), [], []

    def writer(run):
        start.wait()
        try:
            got.append((registry.register(root, "m", run)["version"], run))
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=writer, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failed
    s = registry.load(root, "m")
    assert sorted(n for n, _ in got) == list(range(1, 7)) == sorted(s.versions)
    assert {s.versions[n]["run"] for n, _ in got} == set(runs)  # nothing lost, none twice


def test_racing_alias_moves_one_wins_the_others_get_a_clear_error(root, tmp_path):
    for i in range(5):
        registry.register(root, "m", _run(tmp_path, f"run-{i}"))
    registry.set_alias(root, "m", "champion", 1)
    start, won, lost = threading.Barrier(4), [], []

    def mover(version):
        start.wait()
        try:  # every mover decided on the same view: champion at v1
            won.append(registry.set_alias(root, "m", "champion", version, expect=1)["version"])
        except RegistryConflict as e:
            lost.append(str(e))

    threads = [threading.Thread(target=mover, args=(v,)) for v in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(won) == 1 and len(lost) == 3
    assert all(f"alias 'champion' points to v{won[0]}, not v1" in m and "nothing was written" in m for m in lost)
    s = registry.load(root, "m")
    assert s.aliases == {"champion": won[0]}
    assert len([e for e in s.history if e["kind"] == "alias"]) == 2  # the first set and the winner only


def test_a_move_retries_past_unrelated_changes(tmp_path):
    root = str(tmp_path / "root")
    registry.register(root, "m", _run(tmp_path, "a"))
    registry.register(root, "m", _run(tmp_path, "b"))
    registry.set_alias(root, "m", "champion", 1)
    # another writer registered a version and moved another alias after this one read the log
    registry.register(root, "m", _run(tmp_path, "c"))
    registry.set_alias(root, "m", "challenger", 3)
    assert registry.set_alias(root, "m", "champion", 2, expect=1)["version"] == 2
    with pytest.raises(RegistryConflict, match="points to v2, not v1"):
        registry.set_alias(root, "m", "champion", 3, expect=1)
    with pytest.raises(RegistryConflict, match="points to nothing, not v2"):
        registry.set_alias(root, "m", "canary", 3, expect=2)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda r, run: registry.register(r, "../escape", run), "invalid model name '../escape'"),
        (lambda r, run: registry.register(r, "a/b", run), "invalid model name 'a/b'"),
        (lambda r, run: registry.register(r, "", run), "invalid model name ''"),
        (lambda r, run: registry.register(r, "m", run + "/nope"), "is not a finished run"),
        (lambda r, run: registry.set_alias(r, "m", "latest", 1), "'latest' and version numbers are references"),
        (lambda r, run: registry.set_alias(r, "m", "v2", 1), "invalid alias 'v2'"),
        (lambda r, run: registry.set_alias(r, "m", "-x", 1), "invalid alias '-x'"),
        (lambda r, run: registry.set_alias(r, "m", "champion", 7), "has no version or alias '7' (it has: v1)"),
        (lambda r, run: registry.set_alias(r, "other", "champion", 1), "has no version or alias '1' (it has: none"),
    ],
)
def test_bad_names_and_references_are_refused_naming_them(tmp_path, call, words):
    root, run = str(tmp_path / "root"), _run(tmp_path, "a")
    registry.register(root, "m", run)
    with pytest.raises(RegistryError, match=None) as e:
        call(root, run)
    assert words in str(e.value)
    assert len(registry.load(root, "m").history) == 1  # nothing written
    assert not (tmp_path / "escape").exists()


def test_a_hand_edited_log_is_an_error_naming_the_file(tmp_path):
    root = str(tmp_path / "root")
    for name in "ab":
        registry.register(root, "m", _run(tmp_path, name))
    log = tmp_path / "root" / "registry" / "m" / "log"
    (log / entry_name(2)).write_text("{half")
    with pytest.raises(RegistryError, match=f"{entry_name(2)} is not valid JSON"):
        registry.load(root, "m")
    (log / entry_name(2)).rename(log / entry_name(3))
    with pytest.raises(RegistryError, match=f"expected entry {entry_name(2)} here"):
        registry.load(root, "m")


def test_registry_commands(tmp_path, capsys):
    root = str(tmp_path / "root")
    a = _run(tmp_path, "run-a")
    assert main(["registry", "list", "--root", root]) == 0
    assert "no models registered" in capsys.readouterr().out
    assert main(["registry", "register", "bot", a, "--root", root, "--note", "baseline"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["version"] == 1
    assert main(["registry", "register", "bot", _run(tmp_path, "run-b"), "--root", root]) == 0
    assert main(["registry", "alias", "bot", "champion", "v1", "--root", root, "--expect", "none"]) == 0
    assert main(["registry", "alias", "bot", "champion", "latest", "--root", root, "--expect", "v1"]) == 0
    assert "champion v1 -> v2" in capsys.readouterr().out
    assert main(["registry", "alias", "bot", "champion", "v1", "--root", root, "--expect", "v1"]) == 2
    err = capsys.readouterr().err
    assert "alias 'champion' points to v2, not v1" in err and "oikyo registry show bot" in err
    assert main(["registry", "list", "--root", root]) == 0
    assert "bot\t2\tchampion=v2" in capsys.readouterr().out
    assert main(["registry", "show", "bot", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "champion -> v2" in out and "note: baseline" in out and "champion v1 -> v2" in out
    assert main(["registry", "show", "nobody", "--root", root]) == 2
    assert "no model 'nobody'" in capsys.readouterr().err
    assert main(["registry", "alias", "bot", "champion", "--root", root]) == 2
    assert "give a VERSION" in capsys.readouterr().err
