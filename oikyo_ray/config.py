"""One typed config per run: YAML + dotted ``key=value`` overrides, validated before Ray starts.

The same object (as ``model_dump()``) travels into Ray Train's ``train_loop_config`` and is
re-validated on each worker, so every stage sees exactly what the user asked for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from oikyo_ray.errors import ConfigError

DEMO_MODEL = "oikyo-demo-tiny"
DEMO_DATA = "oikyo-demo-tasks"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        DEMO_MODEL,
        description=f"Hub id, local dir or s3:// URI of the base model; '{DEMO_MODEL}' builds the "
        "embedded tiny Llama-shaped model and tokenizer locally (no download).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Allow model repos to run their own Python code. Off unless you trust it."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training and serving (bf16 needs GPU or recent CPU)."
    )
    cache_dir: str = Field(
        "~/.cache/oikyo", description="Where the embedded demo model and downloaded files are cached."
    )


class DataConfig(_Section):
    paths: list[str] = Field(
        default_factory=lambda: [DEMO_DATA],
        description=f"Data files or globs (json, jsonl, parquet, csv; local or s3://). "
        f"'{DEMO_DATA}' is the small instruction set shipped with oikyo.",
        min_length=1,
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = Field(
        "auto", description="Row format; 'auto' detects it per row from the keys present."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows in validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows held out for test.")
    split_salt: str = Field(
        "oikyo", description="Salt of the content-hash split; change it to draw a different split."
    )
    max_length: int = Field(256, ge=8, description="Max tokens per example; longer ones are truncated.")
    max_chars: int = Field(
        200_000, ge=1, description="Rows whose text is longer than this many characters are rejected."
    )
    train_on_prompt: bool = Field(
        False, description="Compute loss on prompt tokens too (default: assistant tokens only)."
    )


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (peft picks every linear)."
    )


class MethodConfig(_Section):
    type: Literal["lora", "dora", "full"] = Field(
        "lora", description="lora/dora train a peft adapter; full updates every weight."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings (lora, dora).")


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps of linear warmup.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    log_every: int = Field(10, ge=1, description="Report training metrics every N steps.")
    eval_every: int = Field(50, ge=1, description="Validation loss every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")


class ScalingConfig(_Section):
    strategy: Literal["ddp"] = Field("ddp", description="Data-parallel strategy.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (processes).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="Ray CPU reservation per worker; keep the sum below the cluster's CPUs so Ray "
        "Data can stream to the workers.",
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per CPU worker.")
    cache_shard_rows: int = Field(
        100_000,
        ge=0,
        description="Shards of at most this many rows per worker are streamed once and replayed from "
        "worker memory in later epochs; larger shards stream every epoch.",
    )


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Evaluate base vs fine-tuned at the end of finetune.")
    max_samples: int = Field(200, ge=1, description="Test rows evaluated (first N by content hash).")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per test prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address of Ray Serve's proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    route_prefix: str = Field("/", description="Route prefix of the OpenAI-compatible app.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name -> adapter dir served beside the base model."
    )
    base_model_name: str = Field("base", description="The `model` name that selects the bare base.")
    auth: bool = Field(
        True, description="Require a bearer token; may be off only when host is a loopback address."
    )
    token_env: str = Field("OIKYO_API_TOKEN", description="Env var holding the bearer token.")
    token_file: str | None = Field(None, description="File holding the bearer token (env wins).")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longer prompts are refused with 400.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest accepted max_tokens.")

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> "ServeConfig":
        if not self.auth and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("auth may be disabled only when host is 127.0.0.1, localhost or ::1")
        return self


class RunSection(_Section):
    root: str = Field("runs", description="Directory holding one sub-directory per run.")
    name: str | None = Field(
        None, description="Run name (default: <timestamp>-<config hash>).", pattern=r"^[A-Za-z0-9._-]+$"
    )
    serve_after: bool = Field(False, description="Serve the new adapter and send one request (demo).")


class OikyoConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data sources and curation.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    run: RunSection = Field(default_factory=RunSection, description="Run directory and naming.")

    def config_hash(self) -> str:
        """Stable hash of every setting except where the run is written."""
        dump = self.model_dump(mode="json")
        dump["run"] = {k: v for k, v in dump["run"].items() if k not in ("root", "name")}
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:12]


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field (check the spelling; see `oikyo config --help-fields`)" if e[
            "type"
        ] == "extra_forbidden" else e["msg"]
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value", hint="e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key in a nested dict; unknown keys are caught later by the schema."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> OikyoConfig:
    """Load YAML (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}", hint="pass a YAML file path")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + overrides"
    return validate_config(data, origin)


def validate_config(data: dict, origin: str = "config") -> OikyoConfig:
    try:
        return OikyoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def describe_fields(model: type[BaseModel] = OikyoConfig, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted path, default and description (for --help-fields)."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            default = f.get_default(call_default_factory=True)
            out.append(f"{prefix}{name} = {default!r}  # {f.description}")
    return out


def dump_yaml(cfg: OikyoConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
