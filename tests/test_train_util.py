"""Helpers for the tests/test_train_*.py files (no tests here): a prepared run directory with
tokenised train/val splits written straight to parquet, so Ray Train tests skip curation."""

from __future__ import annotations

import json
from functools import lru_cache, partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from oikyo_ray.config import load_config


@lru_cache(maxsize=2)
def _encoded(model_dir: str) -> tuple:
    from transformers import AutoTokenizer

    from oikyo_ray.data.tokenize import encode_messages
    from oikyo_ray.demo.tasks import ASSET
    from oikyo_ray.model.chat_template import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_template(tok)
    rows = [json.loads(line) for line in ASSET.open(encoding="utf-8")]
    return tuple(encode_messages(tok, r["messages"], max_length=64) for r in rows)


def make_run(
    root: Path,
    tiny_model: Path,
    cache_dir: Path,
    overrides: list[str],
    name: str = "r",
    n_train: int = 64,
    n_val: int = 16,
):
    """(cfg, run_dir, manifest) for `fit`: n_train/n_val tokenised demo rows, eval off."""
    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            f"run.root={root}",
            f"run.name={name}",
            "eval.enabled=false",
            "scaling.cpus_per_worker=0.5",
            "train.log_every=1",
            "train.warmup_ratio=0",
            *overrides,
        ],
    )
    enc = _encoded(str(tiny_model))
    run_dir = root / name
    for split, rows in (("train", enc[:n_train]), ("val", enc[n_train : n_train + n_val])):
        d = run_dir / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        table = pa.table({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
        pq.write_table(table, d / "part-0.parquet")
    manifest = {"counts": {"train": n_train, "val": n_val, "test": 0}, "content_hash": "test"}
    if cfg.data.packing:
        from oikyo_ray.data.packing import pack_rows

        rows = enc[:n_train]
        blocks = pack_rows([r["input_ids"] for r in rows], [r["labels"] for r in rows], cfg.data.block_length, 0)
        (run_dir / "data" / "train_packed").mkdir(exist_ok=True)
        pq.write_table(pa.table(blocks), run_dir / "data" / "train_packed" / "part-0.parquet")
        manifest["packing"] = {"blocks": len(blocks["input_ids"])}
    return cfg, run_dir, manifest


def fail_once_at(steps: tuple[int, ...], marker: str, rank: int):
    """A step-hook factory for `fit(step_hook=partial(fail_once_at, steps, marker))`: rank 0 raises
    once at each of `steps`; a file `<marker>.<step>` remembers it across Ray Train's restarts."""
    return partial(_raise_once, tuple(steps), marker) if rank == 0 else None


def _raise_once(steps: tuple[int, ...], marker: str, state) -> None:
    done = Path(f"{marker}.{state.step}")
    if state.step in steps and not done.exists():
        done.write_text(str(state.step))
        raise RuntimeError(f"injected failure at step {state.step} (test)")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(final: Path) -> dict:
    from safetensors.torch import load_file

    f = final / "adapter_model.safetensors"
    if not f.exists():
        f = final / "model.safetensors"
    return load_file(str(f))


def local_setup(tiny_model: Path, cache_dir: Path, overrides: list[str], n: int = 64):
    """(cfg, model, tokenizer, train_epochs, val) for an in-process (Ray-free) loop."""
    import torch

    from oikyo_ray.model.load import load_model, load_tokenizer
    from oikyo_ray.model.methods import apply_method
    from oikyo_ray.train.loop import collate, shuffled_batches
    from oikyo_ray.train.start import seed_everything

    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "train.warmup_ratio=0", "train.log_every=1", *overrides])
    tok = load_tokenizer(cfg.model, str(tiny_model))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in _encoded(str(tiny_model))]
    train, val_rows = rows[:n], rows[n : n + 16]
    seed_everything(cfg.train.seed)
    model = apply_method(load_model(cfg.model, str(tiny_model)), cfg.method, cfg.train.gradient_checkpointing)
    bs = cfg.train.batch_size
    epochs = lambda e: (collate(b, tok.pad_token_id) for b in shuffled_batches(train, bs, cfg.train.seed + e))
    val = [collate({k: [r[k] for r in val_rows] for k in ("input_ids", "labels")}, tok.pad_token_id)]
    torch.set_num_threads(1)
    return cfg, model, tok, epochs, val


def strategy_worker(rank: int, world: int, port: int, tiny_model: str, cache_dir: str, cases: list, out: str):
    """One of `world` spawned processes (gloo): each case = (name, overrides, steps); rank 0 writes
    {name: {"losses": [...], "error": str|None}} to `out`. Runs the real engines, no Ray."""
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        # DeepSpeed JIT-builds its CPU shm-comm op (~1 min): in the directory Ray Train workers use
        # (ray_train.train_func: model.cache_dir/torch_extensions), so a session builds it once
        TORCH_EXTENSIONS_DIR=str(Path(cache_dir) / "torch_extensions"),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from oikyo_ray.config import OikyoConfig
    from oikyo_ray.train.engine import build_engine
    from oikyo_ray.train.loop import LoopHooks, train_loop

    results = {}
    import time

    for name, overrides, steps in cases:
        t0 = time.perf_counter()
        try:
            cfg, model, tok, epochs, val = local_setup(Path(tiny_model), Path(cache_dir), overrides)
            shard = lambda e, f=epochs: (b for i, b in enumerate(f(e)) if i % world == rank)
            cfg = OikyoConfig.model_validate(cfg.model_dump())
            engine = build_engine(model, cfg, steps)
            losses = []

            def report(m, st, eng=engine, losses=losses):
                losses.append(m["loss"])
                if st is not None:
                    eng.full_state()  # the collective gather a checkpoint does

            def all_reduce(t):
                dist.all_reduce(t)
                return t

            train_loop(
                engine.model,
                shard,
                cfg.train,
                steps,
                LoopHooks(report=report, world_size=world, all_reduce=all_reduce, val_batches=lambda v=val: v),
                engine=engine,
            )
            results[name] = {
                "losses": losses,
                "engine": type(engine).__name__,
                "error": None,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        except Exception:
            results[name] = {"losses": [], "error": traceback.format_exc()[-3000:]}
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_strategies(tiny_model: Path, cache_dir: Path, cases: list, out: Path, world: int = 2) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(
        strategy_worker, args=(world, port, str(tiny_model), str(cache_dir), cases, str(out)), nprocs=world, join=True
    )
    return json.loads(out.read_text())
