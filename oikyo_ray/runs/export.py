"""Package a run's adapter for deployment: adapter-only, or merged into the base (safetensors),
with the tokenizer and a model card listing data, metrics and limits. Loadable by plain
transformers/peft (Ray-free)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from peft import PeftModel

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import OikyoError
from oikyo_ray.model.load import load_model, load_tokenizer, resolve_model_path
from oikyo_ray.runs import store
from oikyo_ray.runs.gguf import QUANTS, modelfile, write_gguf

EXPORT_PARTS = ("config.yaml", "lineage.json", "eval/report.json", "adapter", "model")  # all export reads


def _final_dir(run: Path) -> Path:
    for name in ("adapter", "model"):
        if (run / name / "config.json").is_file() or (run / name / "adapter_config.json").is_file():
            return run / name
    raise OikyoError(
        f"{run} has no trained adapter or model (expected {run}/adapter)", hint="export a run whose training finished"
    )


def _license_lines(found: dict | None) -> list[str]:
    """The licences the run was checked against (`data/licenses.py`), as lineage recorded them."""
    if not found:
        return ["- licences: not recorded"]
    model = found["model"]
    lines = [f"- base model licence: {model['license'] or 'unknown'} ({model['from']})"]
    lines += [f"- `{f}`: {v['license'] or 'unknown'} ({v['from']})" for f, v in sorted(found["data"].items())]
    return lines


def model_card(run: Path, cfg: OikyoConfig, merged: bool) -> str:
    lineage = json.loads((run / "lineage.json").read_text()) if (run / "lineage.json").exists() else {}
    report = json.loads((run / "eval/report.json").read_text()) if (run / "eval/report.json").exists() else None
    lines = [
        f"# {run.name}",
        "",
        f"Fine-tuned from `{cfg.model.name_or_path}` with oikyo ({cfg.method.type}"
        f"{', merged into the base' if merged else ', adapter only: load it on the base model'}).",
        "",
        "## Data",
        "",
        f"- sources: {', '.join(cfg.data.paths)}",
        f"- content hash: `{lineage.get('data_content_hash', 'unknown')}`",
        f"- rows: {json.dumps(lineage.get('data_counts', {}))}",
        *_license_lines(lineage.get("licenses")),
        "",
        "## Training",
        "",
        f"- seed {cfg.train.seed}, lr {cfg.train.lr}, epochs {cfg.train.epochs}, "
        f"batch {cfg.train.batch_size} x {cfg.scaling.num_workers} workers",
        f"- config hash `{lineage.get('config_hash', cfg.config_hash())}`, code `{lineage.get('code_commit')}`",
        f"- versions: {json.dumps(lineage.get('versions', {}))}",
        "",
        "## Evaluation",
        "",
    ]
    if report:
        lines += ["| metric | base | fine-tuned |", "|---|---|---|"]
        lines += [
            f"| {k} | {report['base'][k]:.4f} | {report['tuned'][k]:.4f} |"
            for k in ("loss", "exact_match", "token_f1")
            if k in report["base"] and k in report["tuned"]
        ]
    else:
        lines.append("Not evaluated.")
    lines += [
        "",
        "## Limits",
        "",
        "- Evaluated only on the held-out split of the data above; behaviour outside it is untested.",
        "- Inherits the base model's licence, biases and failure modes.",
        "",
    ]
    return "\n".join(lines)


def _merged(cfg: OikyoConfig, src: Path):
    """The run's final weights as one transformers model (a LoRA/DoRA adapter merged into its base)
    and the tokenizer that goes with them."""
    base_path = resolve_model_path(cfg.model)
    if (src / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(load_model(cfg.model, base_path), str(src)).merge_and_unload()
    else:
        model = load_model(cfg.model, str(src))
    tokenizer_path = str(src) if (src / "tokenizer_config.json").exists() else base_path
    return model, load_tokenizer(cfg.model, tokenizer_path)


def export_run(
    run: str | Path, out: str | Path, merge: bool = False, fmt: str = "safetensors", quant: str = "f16"
) -> Path:
    """Export a local run directory, or an s3:// run (the files export needs, fetched to a temp dir).
    `fmt="gguf"` writes the merged model as `model-<quant>.gguf` with an Ollama `Modelfile`."""
    if fmt not in ("safetensors", "gguf"):
        raise OikyoError(f"--format {fmt!r} is not one of safetensors, gguf")
    if fmt == "gguf" and quant not in QUANTS:
        raise OikyoError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise OikyoError(f"export target {out} is not empty", hint="choose a new directory")
    if store.is_remote(run):
        if not store.exists(store.join(run, "config.yaml")):
            raise OikyoError(f"{run} is not a run directory (no config.yaml)")
        with tempfile.TemporaryDirectory(prefix="oikyo-export-") as tmp:
            local = store.download(str(run), Path(tmp) / store.run_name(run), only=EXPORT_PARTS)
            return export_run(local, out, merge, fmt, quant)
    run = Path(run).expanduser().resolve()
    if not (run / "config.yaml").is_file():
        raise OikyoError(f"{run} is not a run directory (no config.yaml)")
    cfg = OikyoConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    src = _final_dir(run)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        model, tokenizer = _merged(cfg, src)
        name = f"model-{quant}.gguf"
        write_gguf(model, tokenizer, out / name, quant, name=run.name)
        (out / "Modelfile").write_text(modelfile(name, tokenizer))
        merge = True
    elif merge and (src / "adapter_config.json").is_file():
        model, tokenizer = _merged(cfg, src)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    else:
        for f in src.iterdir():
            if f.is_file() and f.suffix not in (".bin", ".pt", ".pkl") and f.name != "trainer_state.json":
                shutil.copy2(f, out / f.name)
    (out / "README.md").write_text(model_card(run, cfg, merge))
    return out
