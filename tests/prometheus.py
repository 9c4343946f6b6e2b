"""Real Prometheus (and Alertmanager) from the OS packages for tests: started on free loopback
ports, scraping the test Ray cluster's metrics endpoint, stopped by the caller."""

import subprocess
import time
from pathlib import Path

import httpx


def start_process(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    """Start `cmd` and wait until `ready_url` answers 200 (its log in the failure message)."""
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{cmd[0]} not ready: {log.read_text()[-2000:]}")


def start_prometheus(
    binary: str,
    work: Path,
    port: int,
    metrics_url: str,
    rules: Path | None = None,
    alertmanager_port: int | None = None,
) -> subprocess.Popen:
    """Prometheus scraping `metrics_url` every second (rules and an Alertmanager optional)."""
    target = metrics_url.removeprefix("http://").removesuffix("/metrics")
    lines = ["global: {scrape_interval: 1s, evaluation_interval: 1s}"]
    if rules is not None:
        lines.append(f"rule_files: ['{rules}']")
    if alertmanager_port is not None:
        lines.append(
            f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{alertmanager_port}']}}]}}]}}"
        )
    lines.append(f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{target}']}}]}}]")
    (work / "prom.yml").write_text("\n".join(lines) + "\n")
    cmd = [
        binary,
        f"--config.file={work / 'prom.yml'}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return start_process(cmd, f"http://127.0.0.1:{port}/-/ready", work / "prom.log")
