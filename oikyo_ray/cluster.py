"""Connect to Ray: an existing cluster when RAY_ADDRESS is set (or inside `ray job submit`),
otherwise a local in-process cluster with the dashboard bound to 127.0.0.1 only."""

from __future__ import annotations

import logging
import os


def default_auth_mode() -> None:
    """Ray 2.60 clusters require token auth, and a driver must know before `import ray`:
    when joining a cluster (RAY_ADDRESS) with a token on disk, turn token mode on."""
    token_file = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
    if (
        os.environ.get("RAY_ADDRESS")
        and "RAY_AUTH_MODE" not in os.environ
        and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file))
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    import ray  # noqa: PLC0415 -- imported here, not at the top, so default_auth_mode can run before it

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": not quiet}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
