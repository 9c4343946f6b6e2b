"""`oikyo deploy` and `oikyo ab` on a real local Ray with real Serve apps, real HTTP and a real
Prometheus: a run failing its gates and one missing a staging budget are refused with the reason;
a passing run becomes the champion and answers; a canary goes live, is promoted and rolled back
under steady load without a failed request; the A/B readout comes from Prometheus."""

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from oikyo_ray.cli import main
from oikyo_ray.config import dump_yaml, load_config
from oikyo_ray.registry import registry

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TOKEN = "deploy-test-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}


def _write_run(cfg, model_path: str, run: Path, seed: int, passed: bool = True) -> str:
    """A finished run as `oikyo finetune` leaves it: config, lineage, a LoRA adapter (random
    weights: deploys do not care what it learned), an eval report whose gates pass or fail."""
    from peft import LoraConfig, get_peft_model

    from oikyo_ray.model.load import load_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_model(cfg.model, model_path), lora).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "lineage.json").write_text(json.dumps({"base_model": cfg.model.name_or_path, "data_content_hash": "x"}))
    (run / "eval").mkdir()
    gates = [{"name": "tuned:exact_match", "passed": passed}]
    (run / "eval" / "report.json").write_text(json.dumps({"passed": passed, "gates": gates, "tuned": {"loss": 1.0}}))
    return str(run)


@pytest.fixture(scope="module")
def setup(ray_session, tiny_model, cache_dir, tmp_path_factory):
    from tests.conftest import _free_port

    work = tmp_path_factory.mktemp("deploy")
    (work / "token").write_text(TOKEN)
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"run.root={work / 'runs'}",
            f"serve.port={_free_port()}",
            f"serve.token_file={work / 'token'}",
            "serve.cpus_per_replica=0.25",
            "serve.registry_poll_s=0.5",
            "deploy.load.rate_per_s=4",
            "deploy.load.duration_s=2",
            "deploy.load.prompt_tokens=[8,16]",
            "deploy.load.max_tokens=[4,8]",
            "deploy.load.warmup_requests=1",
        ],
    )
    runs = {
        name: _write_run(cfg, str(tiny_model), work / "runs" / name, seed, passed)
        for name, seed, passed in (("good-a", 0, True), ("good-b", 1, True), ("bad", 2, False))
    }
    return cfg, runs


class SteadyLoad:
    """Requests for the registry model, one after another per user thread, until stopped; each
    answer is rated (POST /v1/feedback): users like v1's answers and not v2's."""

    def __init__(self, url: str, users: int = 3):
        self.url, self.records, self.ratings, self.stop = url, [], [], threading.Event()
        self.threads = [threading.Thread(target=self._user, args=(f"user-{i}",), daemon=True) for i in range(users)]

    def _user(self, user: str) -> None:
        with httpx.Client(timeout=120, headers=H) as c:
            while not self.stop.is_set():
                body = {"model": "bot", "prompt": "Hello", "max_tokens": 2, "temperature": 0, "user": user}
                try:
                    r = c.post(f"{self.url}/v1/completions", json=body)
                    self.records.append((time.time(), user, r.status_code, r.headers.get("x-oikyo-model")))
                    if r.status_code == 200:
                        thumbs = "down" if r.headers["x-oikyo-model"] == "bot-v2" else "up"
                        rating = {"id": r.json()["id"], "thumbs": thumbs, "user": user}
                        self.ratings.append(c.post(f"{self.url}/v1/feedback", json=rating).status_code)
                except httpx.HTTPError as e:
                    self.records.append((time.time(), user, type(e).__name__, None))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def wait_for(self, variant: str, timeout: float = 120) -> float:
        """Wait until `variant` answers a request; returns when it did."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(v == variant for _, _, _, v in list(self.records)):
                return time.time()
            time.sleep(0.2)
        raise AssertionError(f"{variant} did not answer within {timeout}s: {self.records[-5:]}")


def _settled(load: SteadyLoad) -> list[str]:
    """The variants that answer once a registry change has reached the app (a few poll intervals)."""
    time.sleep(2)
    since = time.time()
    time.sleep(2)
    return [v for t, _, _, v in list(load.records) if t > since]


def test_deploy_gates_budgets_canary_and_rollback(setup, ray_session, tmp_path, capsys):
    from ray import serve

    from oikyo_ray.model.load import resolve_model_path
    from oikyo_ray.serve.ray_serve import start
    from tests.conftest import _free_port, os_tool
    from tests.prometheus import start_prometheus

    cfg, runs = setup
    root = cfg.run.root

    # a run whose eval gates failed: refused, nothing written
    assert main(["deploy", runs["bad"], "--model", "bot"]) == 1
    assert "eval gate 'tuned:exact_match' failed" in capsys.readouterr().err
    assert registry.list_models(root) == []

    # the staging load test misses a budget: refused with the figures, kept with the version
    assert main(["deploy", runs["good-a"], "--model", "bot", "deploy.budgets.p99_ms=0.001"]) == 1
    err = capsys.readouterr().err
    assert "missed its budgets: p99 latency" in err and "above deploy.budgets.p99_ms 0.001 ms" in err, err[-1500:]
    state = registry.load(root, "bot")
    assert state.aliases == {} and state.versions[1]["staging"][0]["passed"] is False
    assert state.versions[1]["staging"][0]["figures"]["requests"] > 0

    # within budgets: the champion
    assert main(["deploy", runs["good-a"], "--model", "bot"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "model": "bot",
        "version": 1,
        "canary": None,
    }
    figures = registry.load(root, "bot").versions[1]["staging"][-1]["figures"]
    assert figures["error_rate"] == 0 and figures["tokens_per_s"] > 0 and figures["cost_per_1m_tokens"] > 0

    prod = cfg.model_copy(deep=True)
    prod.serve.registry_models = ["bot"]
    prod.serve.feedback.enabled, prod.serve.feedback.max_per_user_per_hour = True, 100_000
    prod.serve.capture.root = str(tmp_path / "capture")
    url = start(prod, resolve_model_path(prod.model), name="prod")
    prom_port = _free_port()
    prometheus = start_prometheus(os_tool("prometheus"), tmp_path, prom_port, ray_session["metrics"])
    try:
        r = httpx.post(
            f"{url}/v1/completions", headers=H, timeout=60, json={"model": "bot", "prompt": "Hi", "max_tokens": 2}
        )
        assert r.status_code == 200 and r.headers["x-oikyo-model"] == "bot-v1" and r.json()["model"] == "bot-v1"

        with SteadyLoad(url, users=6) as load:
            # a 50% canary (live, no restart), sticky per user
            assert main(["deploy", runs["good-b"], "--model", "bot", "--canary", "50"]) == 0
            live = load.wait_for("bot-v2")
            time.sleep(3)
            canary = [(u, v) for t, u, s, v in list(load.records) if t > live + 1]
            by_user = {u: {v for uu, v in canary if uu == u} for u, _ in canary}
            assert all(len(vs) == 1 for vs in by_user.values()), by_user  # one user, one variant
            assert {"bot-v1", "bot-v2"} == set().union(*by_user.values())

            # the readout, from Prometheus scraping the app
            deadline, out = time.time() + 120, ""
            while time.time() < deadline and "users rate the challenger lower" not in out:
                time.sleep(2)
                assert (
                    main(
                        [
                            "ab",
                            "report",
                            "bot",
                            "--root",
                            root,
                            "--prometheus",
                            f"http://127.0.0.1:{prom_port}",
                            "--window",
                            "5m",
                        ]
                    )
                    == 0
                )
                out = capsys.readouterr().out
            assert "champion    v1" in out and "challenger  v2" in out, out
            # the ratings: v2's answers are rated down, so the readout says roll back
            assert "recommendation: roll back (users rate the challenger lower: 0% positive" in out, out

            # promoted live: v2 answers everyone; rolled back live: v1 again
            assert main(["ab", "promote", "bot", "--root", root]) == 0
            promoted = _settled(load)
            assert main(["ab", "rollback", "bot", "--root", root]) == 0
            back = _settled(load)
        assert set(promoted) == {"bot-v2"} and set(back) == {"bot-v1"}
        statuses = [s for _, _, s, _ in load.records]
        assert len(statuses) > 30 and set(statuses) == {200}, [r for r in load.records if r[2] != 200][:5]
        assert len(load.ratings) > 30 and set(load.ratings) == {202}, load.ratings[:5]
        state = registry.load(root, "bot")
        assert state.aliases == {"champion": 1} and state.traffic == {"champion": 100.0}
        capsys.readouterr()
        assert main(["registry", "show", "bot", "--root", root]) == 0
        shown = capsys.readouterr().out
        assert "FAILED: p99 latency" in shown and "traffic: champion 100" in shown
        assert "traffic challenger 50, champion 50" in shown and "v2 staging test passed" in shown
    finally:
        prometheus.kill()
        prometheus.wait(timeout=30)
        serve.shutdown()  # the proxy holds this module's port: later modules start their own
