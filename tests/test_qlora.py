"""QLoRA (a 4-bit bitsandbytes base + LoRA) on CPU: bnb repacks 4-bit weights for its inference
kernel on an eval no-grad forward, after which LoRA gradients silently become None; the guard in
oikyo_ray/model/qlora.py keeps training correct across evals (Ray-free loop and a Ray DDP run)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

try:  # tests/ may or may not be a package
    from tests.test_train_util import _encoded, make_run, metrics
except ImportError:
    from test_train_util import _encoded, make_run, metrics

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (pip install -e '.[qlora]')"
)

QV = "method.lora.target_modules=[q_proj,v_proj]"  # every path from them to the loss crosses 4-bit layers


def _qlora(model_dir, cache_dir, overrides=(), ckpt=None):
    """(cfg, peft model on a 4-bit base, train batches, val batches) via the worker's own loader
    (the adapter from checkpoint `ckpt`, if given)."""
    from oikyo_ray.config import load_config
    from oikyo_ray.train.loop import collate
    from oikyo_ray.train.start import load_model_to_train, seed_everything

    cfg = load_config(
        None,
        [
            f"model.cache_dir={cache_dir}",
            "method.type=qlora",
            "train.warmup_ratio=0",
            "train.log_every=1",
            "train.batch_size=8",
            *overrides,
        ],
    )
    seed_everything(cfg.train.seed)
    torch.set_num_threads(1)
    model = load_model_to_train(cfg, str(model_dir), ckpt)
    rows = list(_encoded(str(model_dir)))
    batch = lambda rs: collate({k: [r[k] for r in rs] for k in ("input_ids", "labels")}, 0)  # noqa: E731
    train = [batch(rows[i : i + 8]) for i in range(0, 64, 8)]
    return cfg, model, train, [batch(rows[64:80])]


def _layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _step(model, opt, batch) -> tuple[float, int]:
    """One optimizer step; (loss, trainable tensors that got no gradient)."""
    from oikyo_ray.train.loop import loss_on

    model.train()
    loss, _ = loss_on(model, batch)
    loss.backward()
    missing = sum(p.grad is None for p in model.parameters() if p.requires_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), missing


def test_qlora_keeps_learning_across_evals(tiny_model, cache_dir):
    """The real loop (train_loop + its eval_loss every 3 steps) on the 4-bit tiny model."""
    from oikyo_ray.model.methods import check_method
    from oikyo_ray.train.loop import LoopHooks, train_loop

    cfg, model, train, val = _qlora(
        tiny_model, cache_dir, [QV, "train.eval_every=3", "train.lr=5e-3", "train.checkpoint_every=100"]
    )
    check_method(cfg.method)  # allowed on CPU now that bitsandbytes is here
    assert _layers(model) and all(not m.support_avx512bf16_for_cpu for m in _layers(model))
    assert all(m.compute_dtype == torch.float32 for m in _layers(model))  # CPU compute dtype
    params = [p for p in model.parameters() if p.requires_grad]
    got: set[int] = set()
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: got.add(id(p)))
    per_step, reports = [], []

    def on_step(st):
        per_step.append(len(got))
        got.clear()

    hooks = LoopHooks(report=lambda m, ck: reports.append(dict(m)), val_batches=lambda: val, on_step=on_step)
    train_loop(model, lambda e: iter(train), cfg.train, 12, hooks)
    vals = [r["val_loss"] for r in reports if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[1] < vals[0]  # still falling after evals
    assert per_step[3:] == [len(params)] * 9  # every LoRA tensor gets a gradient after each eval
    losses = [r["loss"] for r in reports]
    assert sum(losses[-3:]) < sum(losses[3:6]) - 0.3
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _layers(model))


def test_qlora_resumes_exactly(tiny_model, cache_dir, tmp_path):
    """Stopped after the step-3 checkpoint (mid-epoch, between evals) and resumed in a fresh 4-bit
    model, a run ends with the uninterrupted run's adapter bit for bit: every load quantizes the
    base alike, and the checkpoint brings back the adapter, optimizer, schedule, RNG (LoRA dropout)
    and data position. Without the optimizer state it drifts."""
    from oikyo_ray.train.checkpoint import restore, write_checkpoint
    from oikyo_ray.train.engine import build_engine
    from oikyo_ray.train.loop import LoopHooks, train_loop

    k, n, ckpt = 3, 6, tmp_path / "ckpt"
    overrides = [
        QV,
        "train.grad_accum=2",
        "train.lr=5e-3",
        f"train.checkpoint_every={k}",
        "train.eval_every=2",
        "method.lora.dropout=0.1",
    ]

    def run(resume: bool, optimizer: bool = True) -> dict:
        cfg, model, train, val = _qlora(tiny_model, cache_dir, overrides, ckpt if resume else None)
        engine = build_engine(model, cfg, n)
        if not optimizer:
            engine.load_optimizer = lambda sd: None
        state = restore(engine, ckpt) if resume else None
        final = {}

        def report(metrics, st):
            if st is None:
                return
            model_sd, optim_sd = engine.full_state()
            if st.step == k and not resume:
                write_checkpoint(ckpt, model, model_sd, optim_sd, st)
            final.update({name: v.detach().clone() for name, v in model_sd.items() if "lora_" in name})

        train_loop(
            model,
            lambda e: iter(train),
            cfg.train,
            n,
            LoopHooks(report=report, val_batches=lambda: val),
            engine=engine,
            state=state,
        )
        return final

    a, b, c = run(False), run(True), run(True, optimizer=False)
    assert len(a) == 8 and a.keys() == b.keys() == c.keys()  # lora_A and lora_B of q, v in 2 layers
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert max(float((a[name] - c[name]).abs().max()) for name in a) > 1e-4


@pytest.fixture(scope="module")
def model_32(tiny_model, tmp_path_factory):
    """The tiny model with an MLP width bnb's CPU repack accepts (a multiple of 32; the tiny model's
    172 makes the unguarded eval forward fail outright)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-192")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)  # the same tokenizer
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.intermediate_size = 192
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    return out


def _needs_repacking_cpu():
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")


def test_without_the_guard_an_eval_cuts_lora_grads(model_32, cache_dir, monkeypatch):
    """bnb's behaviour the guard exists for; fails if a bitsandbytes release changes it."""
    _needs_repacking_cpu()
    import oikyo_ray.model.methods as methods
    import oikyo_ray.model.qlora as qlora
    from oikyo_ray.train.loop import eval_loss

    monkeypatch.setattr(methods, "keep_trainable", lambda m: m)  # apply_method without the guard
    _, model, train, val = _qlora(model_32, cache_dir, [QV])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    assert _step(model, opt, train[0])[1] == 0
    eval_loss(model, val)
    assert all(qlora.is_packed(m) for m in _layers(model))
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        assert _step(model, opt, train[1])[1] == 8  # every LoRA A and B: no gradient at all
    monkeypatch.undo()
    qlora.keep_trainable(model)  # applied late it undoes the repack
    assert not any(qlora.is_packed(m) for m in _layers(model))
    assert _step(model, opt, train[2])[1] == 0


def test_guard_unpacks_before_a_training_forward_if_bnb_repacks_anyway(model_32, cache_dir, monkeypatch):
    _needs_repacking_cpu()
    import oikyo_ray.model.qlora as qlora
    from oikyo_ray.errors import ModelError
    from oikyo_ray.train.loop import eval_loss

    _, model, train, val = _qlora(model_32, cache_dir, [QV])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for m in _layers(model):
        m.support_avx512bf16_for_cpu = True  # as if bnb ignored the switch
    eval_loss(model, val)
    assert all(qlora.is_packed(m) for m in _layers(model))
    assert _step(model, opt, train[0])[1] == 0  # the pre-hook unpacked each layer first
    assert not any(qlora.is_packed(m) for m in _layers(model))

    eval_loss(model, val)
    monkeypatch.setattr(qlora, "unpack", lambda m: 1 / 0)  # a bnb whose repack cannot be undone
    with pytest.raises(ModelError, match="LoRA gradients would silently be None"):
        _step(model, opt, train[1])


@pytest.mark.slow
@pytest.mark.ray
def test_qlora_on_ray_ddp_cpu_learns_saves_and_merges(ray_session, tiny_model, cache_dir, tmp_path):
    """2 DDP (gloo) workers on a 4-bit base, val every 2 steps; the adapter works on the full base."""
    from oikyo_ray.config import dump_yaml
    from oikyo_ray.model.load import load_model
    from oikyo_ray.runs.export import export_run
    from oikyo_ray.train.loop import eval_loss
    from oikyo_ray.train.ray_train import fit

    cfg, run, man = make_run(
        tmp_path,
        tiny_model,
        cache_dir,
        [
            "method.type=qlora",
            "scaling.num_workers=2",
            "train.batch_size=4",
            "train.max_steps=8",
            "train.eval_every=2",
            "train.checkpoint_every=4",
            "train.lr=5e-3",
        ],
    )
    final = fit(cfg, run, str(tiny_model), man, log=lambda s: None)
    rows = metrics(run)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[-1]["step"] == 8 and len(vals) == 4 and vals[-1] < vals[0]
    assert sum(r["loss"] for r in rows[-2:]) < sum(r["loss"] for r in rows[2:4])  # falling after evals
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (final / "adapter_model.safetensors").is_file()

    (run / "config.yaml").write_text(dump_yaml(cfg))
    merged_dir = export_run(run, tmp_path / "export", merge=True)
    _, _, _, val = _qlora(tiny_model, cache_dir)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = load_model(cfg.model, str(tiny_model))
    assert eval_loss(merged, val) < eval_loss(base, val) - 0.5  # the 4-bit-trained adapter transfers
