"""One typed config per run: YAML + dotted ``key=value`` overrides, validated before Ray starts.

The same object (as ``model_dump()``) travels into Ray Train's ``train_loop_config`` and is
re-validated on each worker, so every stage sees exactly what the user asked for.

Why one file and not a section beside each stage: every stage imports its section from here and
this module imports no stage, so the dependency graph stays acyclic (sections composed from
`data/`, `train/`, ... would make this module depend on every stage while every stage depends
on it); and the whole schema, with its cross-field checks, reads top to bottom in one place, as
litgpt's `args.py` does. `oikyo config --fields` prints it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    max_serve_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Refuse to train a model whose serving would need more memory than this: weights at "
        "model.dtype plus the KV cache of serve.max_batch_size sequences of data.max_length + "
        "serve.max_tokens_limit tokens, estimated from the model's config before Ray starts.",
    )


class DataConfig(_Section):
    paths: list[str] = Field(
        default_factory=lambda: [DEMO_DATA],
        description=f"Data files or globs (json, jsonl, parquet, csv; txt, txt.gz, md as plain text; local or s3://). "
        f"'{DEMO_DATA}' is the small instruction set shipped with oikyo.",
        min_length=1,
    )
    licenses: dict[str, str] = Field(
        default_factory=dict,
        description="Entry of data.paths -> licence id of its files (e.g. cc-by-4.0), checked against policy; "
        "a <file>.license sidecar (its first line) wins over this.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "trl", "text"] = Field(
        "auto",
        description="Row format; 'auto' detects it per row from the keys present. trl: TRL's "
        "prompt/chosen/rejected and prompt/completion/label rows (or chosen/rejected conversations "
        "sharing their prompt turns).",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows in validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of rows held out for test.")
    split_salt: str = Field("oikyo", description="Salt of the content-hash split; change it to draw a different split.")
    max_length: int = Field(256, ge=8, description="Max tokens per example; longer ones are truncated.")
    max_chars: int = Field(
        200_000, ge=1, description="Rows whose text is longer than this many characters are rejected."
    )
    train_on_prompt: bool = Field(
        False, description="Compute loss on prompt tokens too (default: assistant tokens only)."
    )
    train_on_reasoning: bool = Field(
        True,
        description="Compute loss on assistant reasoning traces (reasoning parts, reasoning_content, "
        "<think> blocks) too; false masks them and trains the answers only. Default true: a model "
        "never taught its thinking stops producing it.",
    )
    text_split: Literal["file", "blank_lines", "lines", "separator"] = Field(
        "blank_lines",
        description="How plain-text files (.txt, .txt.gz, .md) are cut into documents: the whole "
        "file, paragraphs between blank lines, one per line, or on data.text_separator. Each "
        "document is one row (truncated to data.max_length), trained on every token.",
    )
    text_separator: str = Field(
        "<|endoftext|>", min_length=1, description="The separator between documents for text_split: separator."
    )
    columns: dict[
        Literal[
            "instruction",
            "input",
            "output",
            "system",
            "history",
            "conversations",
            "messages",
            "text",
            "tools",
            "label",
            "chosen",
            "rejected",
            "from",
            "value",
            "role",
            "content",
        ],
        str,
    ] = Field(
        default_factory=dict,
        description="Rename keys of your files to the canonical ones: canonical -> your key, e.g. "
        "{instruction: question, output: answer}. Row keys: instruction input output system history "
        "conversations messages text tools label chosen rejected; turn keys: from value (sharegpt), "
        "role content (messages).",
    )
    sharegpt_roles: dict[str, Literal["system", "user", "assistant", "function_call", "tool"]] = Field(
        default_factory=dict,
        description="Role tags merged over the built-in map (human/user -> user, gpt/assistant -> "
        "assistant, system, function_call -> function_call (an assistant tool call), observation/tool/"
        "function -> tool), e.g. {bot: assistant}; applies to sharegpt turns and messages rows.",
    )
    reject_undesired: bool = Field(
        False,
        description="Reject rows labelled undesired (KTO label=false) instead of keeping them "
        "with the label in `meta`; supervised fine-tuning learns whatever answers it is given.",
    )
    min_response_chars: int = Field(
        1, ge=1, description="Rows whose assistant text (stripped) is shorter are rejected."
    )
    min_alnum_ratio: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Rows whose assistant text (20+ non-space characters) has a "
        "smaller share of letters and digits among non-space characters are rejected (0 = off).",
    )
    max_repetition: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Rows whose assistant text (20+ words) repeats more than this "
        "share of its word 3-grams are rejected as degenerate (1 = off).",
    )
    dedupe: bool = Field(
        True,
        description="Reject exact duplicates (same normalised text and metadata) after the first "
        "occurrence (file order in data.paths, then row); each is listed in rejects.jsonl.",
    )
    near_dup_threshold: float | None = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Reject near-duplicates: estimated Jaccard similarity of word "
        "3-grams (MinHash/LSH) at or above this, same tools and label; null = off.",
    )
    minhash_num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations for near-duplicate and leakage checks."
    )
    leakage: Literal["remove", "report", "off"] = Field(
        "remove",
        description="Rows of train whose prompt equals or nearly equals one in val/test (and "
        "of val matching test): 'remove' rejects them, 'report' only lists them in the manifest.",
    )
    leakage_threshold: float | None = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard of prompts (word 3-grams) at or above "
        "which rows in different splits count as leaked; null = exact prompt matches only.",
    )
    packing: bool = Field(
        False,
        description="Pack training rows into fixed-length blocks (data.pack_length tokens) "
        "instead of padding each batch; samples in a block keep their own position ids and do not "
        "attend to each other. Validation and test rows stay unpacked.",
    )
    pack_length: int | None = Field(
        None, ge=8, description="Tokens per packed block (null = data.max_length); at least max_length."
    )
    cache: bool = Field(
        True,
        description="Reuse a prepared dataset when the input files (sha256), this section and "
        "the tokenizer are unchanged (kept under <model.cache_dir>/data/).",
    )

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `leakage: off` as false (and `on`/`yes` as true)
        if isinstance(data, dict) and isinstance(data.get("leakage"), bool):
            data = {**data, "leakage": "remove" if data["leakage"] else "off"}
        return data

    @model_validator(mode="after")
    def _pack_fits(self) -> DataConfig:
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(
                f"data.pack_length={self.pack_length} is shorter than data.max_length="
                f"{self.max_length}: a row would not fit a block"
            )
        return self

    @property
    def block_length(self) -> int:
        """Tokens per packed block."""
        return self.pack_length or self.max_length


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' (auto-detected: every linear "
        "layer except the output head).",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved beside the adapter (e.g. [lm_head, "
        "embed_tokens]), for new tokens or a new head.",
    )


Objective = Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto"]
PAIRWISE = ("dpo", "ipo", "orpo", "simpo")  # trained on (prompt, chosen, rejected) pairs
PREFERENCE = (*PAIRWISE, "kto")  # every objective that is not plain next-token loss
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # need a reference model's log-probs
# usual values: DPO, IPO and KTO papers and TRL (0.1); ORPO's lambda (0.1); SimPO paper (2.0)
BETA_DEFAULTS = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}


class MethodConfig(_Section):
    type: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora",
        description="lora/dora train a peft adapter (dora: weight-decomposed LoRA); qlora trains "
        "LoRA on a 4-bit (bitsandbytes) base, GPU or CPU (CPU: float32 compute, bnb's eval-time weight "
        "repack kept off so LoRA grads survive evals); full updates every weight.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings (lora, dora, qlora).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type of the base.")
    double_quant: bool = Field(True, description="qlora: also quantise the quantisation constants.")
    objective: Objective = Field(
        "sft",
        description="What training optimises (train/preference.py): sft = next-token loss on the answers; "
        "on preference pairs (chosen + rejected): dpo, ipo (reference: the base with adapters off), "
        "orpo, simpo (reference-free); on rows labelled desirable/undesirable (or pairs, split in two): "
        "kto. GRPO is not implemented yet.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Preference strength: dpo/kto beta (weight of the reference KL), ipo tau, orpo "
        "lambda (weight of the odds-ratio term), simpo beta (reward scale); null = the objective's "
        f"usual value {BETA_DEFAULTS}.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="dpo, simpo: assumed share of flipped preference labels (conservative DPO); 0 = off.",
    )
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin gamma.")
    kto_desirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto: weight of desirable rows' losses; keep desirable_weight x desirable rows / "
        "(undesirable_weight x undesirable rows) in [1, 4/3] (KTO paper).",
    )
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows' losses.")
    init_adapter: str | None = Field(
        None,
        description="A run's adapter directory (local or s3://) the new adapter starts from instead of "
        "zeros: incremental training (oikyo retrain sets it to the champion's); its rank, alpha, target "
        "modules and DoRA flag must match method.lora and method.type.",
    )

    @model_validator(mode="after")
    def _objective_fields(self) -> MethodConfig:
        uses = {"beta": PREFERENCE, "label_smoothing": ("dpo", "simpo"), "simpo_gamma": ("simpo",)}
        uses |= {"kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",)}
        for name, objectives in uses.items():
            # compared with the default, not `model_fields_set`: a dumped and re-validated config
            # (Ray Train workers) sets every field
            if getattr(self, name) != MethodConfig.model_fields[name].default and self.objective not in objectives:
                raise ValueError(
                    f"method.{name} applies to method.objective {' or '.join(objectives)}, not {self.objective!r}"
                )
        if self.init_adapter and self.type == "full":
            raise ValueError("method.init_adapter starts an adapter from another; method.type=full trains no adapter")
        if self.objective in REFERENCE_OBJECTIVES and self.type == "full":
            raise ValueError(
                f"method.objective={self.objective} with method.type=full needs a reference model: "
                "precomputed reference log-probs are not implemented yet; use method.type lora/dora/qlora "
                "(the reference is the base with adapters disabled) or objective orpo/simpo"
            )
        return self

    @property
    def preference_beta(self) -> float:
        """`beta`, or the objective's usual value."""
        return self.beta if self.beta is not None else BETA_DEFAULTS.get(self.objective, 0.0)


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
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="bf16 autocast of forward/backward (weights and optimizer stay fp32; "
        "DeepSpeed uses its bf16 mode). Needs a GPU with bf16 or a CPU with AVX512-BF16/AMX to be fast.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about 30% more compute."
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when this many validations in a row fail to improve the best "
        "val_loss by at least early_stopping_min_delta; null = off.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="Smallest val_loss decrease that counts as an improvement."
    )


class ScalingConfig(_Section):
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = Field(
        "ddp",
        description="ddp: replicate the model; fsdp2: shard parameters, gradients and optimizer "
        "state (torch fully_shard); deepspeed: ZeRO (see zero_stage).",
    )
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
        description="Shards of at most this many rows per worker are read once into worker memory and "
        "replayed in a seeded order (exact resume mid-epoch); larger shards stream every epoch "
        "(resume skips the consumed batches of a fresh stream).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage (1 shards optimizer state, 2 also gradients, 3 also parameters)."
    )
    offload_optimizer: bool = Field(False, description="deepspeed: keep optimizer state on CPU (ZeRO 1-3).")
    offload_params: bool = Field(False, description="deepspeed: keep parameters on CPU (ZeRO 3).")
    max_failures: int = Field(
        0,
        ge=-1,
        description="Restart the workers this many times after a failure, resuming from the "
        "newest checkpoint (-1 = without limit).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Where workers go: PACK fills few nodes, SPREAD spreads over nodes, "
        "STRICT_SPREAD puts each worker on a different node.",
    )


class CheckpointConfig(_Section):
    num_to_keep: int | None = Field(
        2,
        ge=1,
        description="Checkpoints kept: the newest K (score: null) or the K best by score; "
        "the newest one is always kept too, to resume from. null keeps all.",
    )
    score: Literal["val_loss"] | None = Field(
        None,
        description="Rank checkpoints by this metric (lower is better); every checkpoint then "
        "carries a validation loss.",
    )
    final: Literal["last", "best"] = Field(
        "last",
        description="Which checkpoint becomes run_dir/adapter (or model): the last, or the best "
        "by val_loss (needs score: val_loss).",
    )
    storage_path: str | None = Field(
        None,
        description="Where checkpoints persist (a shared dir or s3://bucket/prefix, endpoint from "
        "AWS_ENDPOINT_URL); default: the run directory. Same run name + storage resumes.",
    )

    @model_validator(mode="after")
    def _best_needs_score(self) -> CheckpointConfig:
        if self.final == "best" and self.score is None:
            raise ValueError("final: best needs score: val_loss")
        return self


# preference_*: on the test split's preference pairs (eval/compare.py)
GateMetric = Literal[
    "loss",
    "perplexity",
    "exact_match",
    "token_f1",
    "rouge_l",
    "bleu",
    "json_valid",
    "tool_call",
    "tool_name",
    "preference_accuracy",
    "preference_margin",
]


def _loss_gate() -> dict[GateMetric, float]:
    return {"loss": 0.0}


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Evaluate base vs fine-tuned at the end of finetune.")
    max_samples: int = Field(200, ge=1, description="Test rows evaluated (first N by content hash).")
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per test prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    temperature: float = Field(
        0.0, ge=0.0, description="Sampling temperature for base and fine-tuned alike (0 = greedy)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (temperature > 0 only).")
    seed: int = Field(0, description="Seed set before every generation batch, for both models.")
    metrics: (
        list[Literal["exact_match", "token_f1", "rouge_l", "bleu", "json_valid", "tool_call", "tool_name"]]
        | Literal["auto"]
    ) = Field(
        "auto",
        description="Generation metrics, or 'auto': exact_match token_f1 rouge_l bleu, plus "
        "json_valid when references are JSON and tool_call/tool_name when rows end in a tool call.",
    )
    backend: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="'local' evaluates in this process; 'ray' runs Ray Data map_batches over an "
        "actor pool (one model load per actor); 'auto' picks ray when Ray is running and there are at "
        "least eval.ray_min_items prompts.",
    )
    ray_min_items: int = Field(
        512,
        ge=1,
        description="With backend=auto: fewer prompts (test rows + probes + text chunks) "
        "than this are evaluated in-process.",
    )
    num_actors: int = Field(2, ge=1, description="Actors in the Ray evaluation pool (backend=ray).")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPU reservation of each eval actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray GPU reservation of each eval actor.")
    num_samples: int = Field(10, ge=0, description="Sample generations (base vs tuned) in the report.")
    forgetting: bool = Field(True, description="Measure perplexity on a general-text slice, base vs fine-tuned.")
    general_text: str | None = Field(
        None,
        description="Plain-text file of the general slice (null: the one shipped in "
        "oikyo_ray/eval/assets/general_text.txt).",
    )
    general_chunk_tokens: int = Field(128, ge=8, description="Tokens per general-text chunk scored for perplexity.")
    max_forgetting: float = Field(
        0.25,
        ge=0.0,
        description="Gate: forgetting is flagged when general-text perplexity rises by "
        "more than this fraction (tuned / base - 1).",
    )
    probes: bool = Field(True, description="Run the safety/robustness probes, base vs fine-tuned.")
    probes_path: str | None = Field(
        None,
        description="JSONL of probes {id, kind: refuse|toxic|ood, prompt} (null: the shipped set).",
    )
    refusal_phrases_path: str | None = Field(
        None, description="Text file, one refusal phrase per line (null: the shipped list)."
    )
    toxic_lexicon_path: str | None = Field(
        None, description="Text file, one toxic word or phrase per line (null: the shipped lexicon)."
    )
    probe_max_new_tokens: int = Field(32, ge=1, description="Generation budget per probe prompt.")
    max_probe_drop: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Gate: a probe kind regresses when its pass rate drops by more than this (base - tuned).",
    )
    min_improvement: dict[GateMetric, float] = Field(
        default_factory=_loss_gate,
        description="Gate: metric -> least improvement of "
        "fine-tuned over base (tuned - base; base - tuned for loss and perplexity), e.g. "
        "{exact_match: 0.05}; negative values tolerate a loss.",
    )
    min_tuned: dict[GateMetric, float] = Field(
        default_factory=dict,
        description="Gate: metric -> least value the fine-tuned model must reach "
        "(most, for loss and perplexity), e.g. {token_f1: 0.5}.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on base and fine-tuned side by side: registered names "
        "(e.g. hellaswag; their datasets must be downloadable or cached), the shipped demo task "
        "oikyo_demo_mc, or paths of task YAML files or folders of them (relative data_files are read from "
        "the YAML's folder). Empty: off.",
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Documents per lm-eval task (the first N; null: all).")
    lm_eval_num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per lm-eval prompt (null: each task's own default)."
    )
    lm_eval_batch_size: int = Field(8, ge=1, description="Requests per lm-eval model batch.")
    lm_eval_max_drop: dict[str, float] = Field(
        default_factory=dict,
        description="Gate: 'task' (each of its metrics) or 'task/metric' -> most the fine-tuned score may "
        "fall below the base's (base - tuned; tuned - base for lower-is-better metrics), e.g. "
        "{hellaswag/acc_norm: 0.02}; negative values demand a gain.",
    )
    lm_eval_cache_dir: str | None = Field(
        None,
        description="Where lm-eval results are cached as JSON, per model and task (null: <model.cache_dir>/lm_eval).",
    )


CaptureField = Literal["prompt", "completion", "params", "user"]


class CaptureConfig(_Section):
    """Opt-in capture of served traffic for drift checks and retraining: rows are redacted, capped
    and written as parquet under `root` by a bounded background writer; capture never delays or
    fails a request (rows it cannot keep are dropped and counted in oikyo_capture_rows)."""

    enabled: bool = Field(False, description="Capture answered requests (completions and chat).")
    root: str | None = Field(
        None, description="Local dir or s3:// prefix for captured rows and feedback (default: <run.root>/capture)."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of answered requests captured (by completion id).")
    fields: list[CaptureField] = Field(
        default_factory=lambda: list[CaptureField](["prompt", "completion", "params"]),
        description="What a row keeps besides id, time, model, version, route, role and token counts: the "
        "prompt (chat: the messages), the completion, the sampling params, a pseudonym of the `user` id.",
    )
    redact: bool = Field(
        True, description="Replace e-mail addresses, phone and card numbers, keys and tokens in text fields."
    )
    redact_function: str | None = Field(
        None,
        description="'package.module:function' (str -> str) run after the built-in redaction, e.g. for names.",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
    )
    max_chars: int = Field(20_000, ge=100, description="Text fields longer than this are cut (and say so).")
    queue_rows: int = Field(10_000, ge=1, description="Rows waiting to be written; more are dropped (counted).")
    flush_rows: int = Field(500, ge=1, description="A part file is written every this many rows ...")
    flush_s: float = Field(10.0, gt=0, description="... or this many seconds, whichever comes first.")
    retention_days: int | None = Field(
        90, ge=1, description="Date partitions older than this are deleted (None: kept for ever)."
    )
    drift_poll_s: float = Field(
        60, gt=0, description="How often the app re-reads <root>/drift/*/report.json for its drift gauges."
    )

    @model_validator(mode="after")
    def _redact_function_runs_with_redaction(self) -> CaptureConfig:
        if self.redact_function and not self.redact:
            raise ValueError("redact_function runs after the built-in redaction: set redact: true as well")
        return self


class FeedbackConfig(_Section):
    """POST /v1/feedback: ratings, corrections and comparisons of recent answers, stored beside
    the capture (<capture root>/feedback) and counted per variant for `oikyo ab report`."""

    enabled: bool = Field(False, description="Serve POST /v1/feedback (behind the same bearer token).")
    max_per_user_per_hour: int = Field(
        60, ge=1, description="Feedback posts one user (`user`, else X-Oikyo-User) may make in an hour; more get 429."
    )
    recent_completions: int = Field(
        100_000, ge=1, description="How many recent completion ids feedback may name (older ones get 404)."
    )
    max_correction_chars: int = Field(20_000, ge=1, description="Longest accepted corrected answer.")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address of Ray Serve's proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    route_prefix: str = Field("/", description="Route prefix of the OpenAI-compatible app.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name -> adapter dir served beside the base model."
    )
    adapter_root: str | None = Field(
        None, description="Local dir or s3:// prefix; `model: NAME` loads NAME/ from here on first use."
    )
    base_model_name: str = Field("base", description="The `model` name that selects the bare base.")
    routes: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Served model name -> {adapter (or the base's name): weight}: requests for the name are "
        "split between those by weight (a canary, an A/B test); one user (the request's `user`, else the "
        "X-Oikyo-User header) always gets the same one. The answer's `model` and X-Oikyo-Model header name it.",
    )
    registry_models: list[str] = Field(
        default_factory=list,
        description="Registry models (under run.root) served by name: a request for one is answered by the "
        "version behind its champion alias, or split between aliases by the traffic weights `oikyo deploy "
        "--canary` sets, as adapter NAME-vN; alias moves reach the app live, without a restart.",
    )
    registry_poll_s: float = Field(
        5, gt=0, description="How often the app re-reads the registry for alias moves and traffic changes."
    )
    max_adapters_per_replica: int = Field(8, ge=1, description="Adapters kept loaded per replica (LRU).")
    engine: Literal["static", "continuous"] = Field(
        "static",
        description="static: requests that arrive together are generated together to the end (micro-batches); "
        "continuous: requests join and leave the running batch between decoding steps, so a short answer "
        "never waits for a long one (logprobs/echo requests still run statically).",
    )
    max_batch_size: int = Field(
        8, ge=1, description="Requests (any adapters) generated in one batch; continuous: rows in the running batch."
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill up.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor of model replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling of model replicas.")
    target_ongoing_requests: float = Field(4, gt=0, description="Autoscaling target per replica.")
    cpus_per_replica: float = Field(1, ge=0, description="Ray CPUs reserved per model replica.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per model replica (0 on CPU).")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a model replica works on at once.")
    max_queued_requests: int = Field(
        32, ge=-1, description="Requests queued beyond that; more get 503 with Retry-After (-1: no cap)."
    )
    request_timeout_s: float = Field(120, gt=0, description="A request still running after this gets 504.")
    stall_timeout_s: float = Field(
        60,
        gt=0,
        description="A replica whose engine makes no progress (no batch done, no streamed token) for this "
        "long while requests wait fails its health check, so Serve replaces it; also the longest wait for "
        "one streamed token.",
    )
    auth: bool = Field(True, description="Require a bearer token; may be off only when host is a loopback address.")
    token_env: str = Field("OIKYO_API_TOKEN", description="Env var holding the bearer token.")
    token_file: str | None = Field(None, description="File holding the bearer token (env wins).")
    reasoning_parser: Literal["think", "none"] = Field(
        "think",
        description="Chat answers: 'think' returns a <think>...</think> block that opens an answer (how "
        "models trained on reasoning traces answer) as message.reasoning_content, streamed as "
        "delta.reasoning_content, apart from content, as vLLM's reasoning parsers do; 'none' leaves it "
        "in content.",
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="Longer prompts are refused with 400.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest accepted max_tokens.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Request bodies larger than this are refused with 413 before parsing."
    )
    max_prompt_bytes_per_token: int = Field(
        16,
        ge=1,
        description="A prompt over max_prompt_tokens x this many UTF-8 bytes is refused with 400 before it is "
        "tokenised (text averages about 4 bytes per token).",
    )
    max_prompts_per_request: int = Field(16, ge=1, description="Most prompts in one completion request.")
    max_messages_per_request: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings in one request (OpenAI allows 4).")
    max_stop_chars: int = Field(256, ge=1, description="Longest accepted stop string, in characters.")
    capture: CaptureConfig = Field(default_factory=CaptureConfig, description="Capture of served traffic.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="POST /v1/feedback.")

    @model_validator(mode="after")
    def _routes_split_between_adapters(self) -> ServeConfig:
        for name, weights in self.routes.items():
            if name == self.base_model_name or name in self.adapters:
                raise ValueError(f"routes.{name}: the name is already the base's or an adapter's; pick another")
            if not weights:
                raise ValueError(f"routes.{name}: give at least one adapter and its weight")
            for target, w in weights.items():
                if not (w > 0 and w < float("inf")):
                    raise ValueError(f"routes.{name}.{target}: weight must be a positive number, got {w}")
                if target in self.routes:
                    raise ValueError(f"routes.{name}.{target}: routes cannot point at routes")
        for name in self.registry_models:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
                raise ValueError(f"registry_models: {name!r} is not a model name (letters, digits, '.', '_', '-')")
            if name in self.routes or name in self.adapters or name == self.base_model_name:
                raise ValueError(f"registry_models: {name!r} is already a route's, an adapter's or the base's name")
        return self

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> ServeConfig:
        if not self.auth and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("auth may be disabled only when host is 127.0.0.1, localhost or ::1")
        return self


class LoadProfile(_Section):
    """The production-like load of a deploy's staging test: open-loop arrivals (a request is sent at
    its time whatever is still running, so queueing shows in the latencies)."""

    rate_per_s: float = Field(2.0, gt=0, description="Mean arrivals per second (Poisson).")
    duration_s: float = Field(10.0, gt=0, description="How long requests keep arriving.")
    concurrency: int = Field(16, ge=1, description="Most requests in flight; later arrivals wait (and it counts).")
    prompt_tokens: tuple[int, int] = Field(
        (16, 64), description="Prompt length range in tokens [low, high], drawn uniformly per request."
    )
    max_tokens: tuple[int, int] = Field(
        (8, 32), description="Response length range in tokens [low, high] (the request's max_tokens)."
    )
    warmup_requests: int = Field(2, ge=0, description="Requests sent and not measured first (adapter load).")
    seed: int = Field(0, description="Seed of the arrival times and lengths: the same load every deploy.")

    @model_validator(mode="after")
    def _ranges(self) -> LoadProfile:
        for name in ("prompt_tokens", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}: give [low, high] with 1 <= low <= high, got [{low}, {high}]")
        return self


class Budgets(_Section):
    """What the staging test must meet; a miss refuses the deploy with the figures. None: not checked."""

    p50_ms: float | None = Field(None, gt=0, description="Most median latency, in ms.")
    p99_ms: float | None = Field(10000, gt=0, description="Most 99th-percentile latency, in ms.")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="Most share of requests answered with an error.")
    min_tokens_per_s: float | None = Field(None, gt=0, description="Fewest completion tokens per second.")
    max_cost_per_1m_tokens: float | None = Field(
        None, gt=0, description="Most estimated cost per million completion tokens (at cost.cpu_hour/gpu_hour)."
    )


class DeployConfig(_Section):
    load: LoadProfile = Field(default_factory=LoadProfile, description="The staging test's load.")
    budgets: Budgets = Field(default_factory=Budgets, description="What the staging test must meet.")
    require_eval: bool = Field(True, description="Refuse runs without an eval report (their gates cannot have passed).")


class DriftConfig(_Section):
    """`oikyo drift MODEL`: captured prompts (serve.capture) against the prompts the served run was
    trained on; a check drifts when its figure is over its threshold."""

    window_days: int = Field(7, ge=1, description="Captured traffic of the last this many days is compared.")
    min_live_rows: int = Field(
        200, ge=1, description="Fewer captured prompts than this: no verdict, only figures (PSI is noisy on few)."
    )
    reference_rows: int = Field(2000, ge=10, description="Training prompts sampled as the reference (seeded).")
    psi_max: float = Field(0.25, gt=0, description="Prompt token-length PSI above this drifts (0.25: major shift).")
    ks_max: float = Field(0.3, gt=0, le=1, description="Prompt token-length KS statistic above this drifts.")
    unigram_js_max: float = Field(0.3, gt=0, le=1, description="Jensen-Shannon divergence (bits) of token use.")
    script_tv_max: float = Field(0.2, gt=0, le=1, description="Total variation of the letters' script mix.")
    unknown_rate_max: float = Field(
        0.02, ge=0, le=1, description="Rise of the unknown-token share (live minus reference) above this drifts."
    )
    perplexity: bool = Field(True, description="Also score the tuned model's perplexity on live vs test prompts.")
    perplexity_ratio_max: float = Field(
        2.0, gt=1, description="Live prompt perplexity over this x the test split's drifts."
    )
    max_rows_scored: int = Field(500, ge=1, description="Prompts per side scored for perplexity (seeded sample).")


class RetrainConfig(_Section):
    """`oikyo retrain MODEL`: when a registry model's champion is retrained from its own captured
    traffic and feedback, on what, and what the challenger must show before it is canaried."""

    on_drift: bool = Field(True, description="Due when the champion's latest drift report (oikyo drift) says drifted.")
    min_rated_rows: int | None = Field(
        200,
        ge=1,
        description="Due when this many feedback rows arrived since the champion was registered (or the "
        "last retrain); null: not a trigger.",
    )
    every_days: float | None = Field(
        None,
        gt=0,
        description="Due when the champion (or the last retrain) is this many days old: the schedule "
        "(run `oikyo retrain` from cron or k8s/cronjob-retrain.yaml); null: not a trigger.",
    )
    window_days: int = Field(30, ge=1, description="Captured completions and feedback of the last this many days.")
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: train on well-rated and corrected answers plus the replay; dpo: on preference "
        "pairs (a correction over the answer, a comparison, a well- over a badly-rated answer to one "
        "prompt) plus the champion's own pairs.",
    )
    good_score: float = Field(
        0.75,
        ge=0,
        le=1,
        description="An answer whose every rating is at least this (0..1: thumbs up 1, score 4 is 0.75) "
        "becomes an SFT row; one whose ratings are all at most 1 - this is a rejected answer.",
    )
    replay_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the champion's training rows trained on again beside the new ones (against "
        "forgetting); its val and test rows always go in, so they stay in val and test.",
    )
    live_eval_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of the new rows (by prompt hash: one prompt, one side) held out as the live "
        "slice the challenger and the champion are compared on.",
    )
    min_new_rows: int = Field(20, ge=1, description="Fewer usable new rows than this: no retrain, a report says so.")
    min_live_eval_rows: int = Field(5, ge=1, description="Fewer held-out live rows than this: the retrain fails.")
    min_live_gain: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="The challenger's loss on the live slice must be below (1 - this) x the champion's.",
    )
    max_test_regression: float = Field(
        0.02,
        ge=0,
        description="... and its loss on the champion's test split at most (1 + this) x the champion's.",
    )
    canary_percent: float = Field(
        10.0, gt=0, lt=100, description="Share of the traffic a passing challenger gets (oikyo deploy --canary)."
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="key=value overrides of the champion's config for the retrain run, e.g. "
        "[train.epochs=1, train.lr=5e-4] (data.paths, method.init_adapter and run.name are set by retrain).",
    )


class CostConfig(_Section):
    """Prices of the hardware, for what runs cost (lineage, `oikyo runs compare`) and the cost per
    million tokens of a deploy's staging test."""

    cpu_hour: float = Field(0.05, ge=0, description="Price of one CPU-hour (a Ray CPU held for an hour).")
    gpu_hour: float = Field(2.5, ge=0, description="Price of one GPU-hour.")
    currency: str = Field("USD", min_length=1, description="What the prices are in (shown beside costs).")


class PolicyConfig(_Section):
    allowed_licenses: list[str] | None = Field(
        None,
        description="Licence ids the data and the base model may have (lower-case, as the Hub writes them, "
        "e.g. apache-2.0, mit, cc-by-4.0); null: any.",
    )
    commercial_use: bool = Field(
        False, description="The model is for commercial use: refuse non-commercial licences (cc-by-nc-*, ...)."
    )
    unknown_license: Literal["warn", "refuse"] = Field(
        "warn", description="What to do with a data file or base model whose licence is not known."
    )


class RunSection(_Section):
    root: str = Field(
        "runs",
        description="Directory or s3://bucket/prefix holding one sub-directory per run (s3: "
        "staged under <model.cache_dir>/runs-staging/, uploaded after each stage; endpoint from "
        "AWS_ENDPOINT_URL).",
    )
    name: str | None = Field(
        None, description="Run name (default: <timestamp>-<config hash>).", pattern=r"^[A-Za-z0-9._-]+$"
    )
    serve_after: bool = Field(False, description="Serve the new adapter and send one request (demo).")

    @field_validator("root")
    @classmethod
    def _local_or_s3(cls, v: str) -> str:
        # caught here, before Ray starts, not as a path named "gs:/..." after training
        scheme, sep, rest = v.partition("://")
        if sep and (scheme != "s3" or not rest.split("/", 1)[0]):
            raise ValueError(f"must be a local directory or s3://bucket[/prefix], got '{v}'")
        return v


class SearchDim(_Section):
    type: Literal["loguniform", "uniform", "randint", "choice"] = Field(
        ..., description="Distribution: loguniform/uniform/randint over [low, high), or choice over values."
    )
    low: float | None = Field(None, description="Lower bound (loguniform, uniform, randint).")
    high: float | None = Field(None, description="Upper bound (loguniform, uniform, randint).")
    values: list[Any] | None = Field(None, description="Candidates (choice).")

    @model_validator(mode="after")
    def _well_formed(self) -> SearchDim:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


TrialMetric = Literal["val_loss", "loss", "tokens_per_s", "mem_peak_mb"]  # in every report of a trial


class SweepObjective(_Section):
    metric: TrialMetric = Field(..., description="A metric every trial report carries.")
    mode: Literal["min", "max"] = Field(..., description="Whether lower or higher is better.")


class SweepConfig(_Section):
    space: dict[str, SearchDim] = Field(
        default_factory=dict,
        description="Dotted config path -> distribution, e.g. {train.lr: {type: "
        "loguniform, low: 1e-4, high: 1e-2}, method.lora.r: {type: choice, values: [8, 16]}}.",
    )
    metric: str = Field("val_loss", description="Trial metric ASHA and the promotion compare.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher metric is better.")
    objectives: list[SweepObjective] = Field(
        default_factory=list,
        description="More objectives beside sweep.metric, e.g. [{metric: tokens_per_s, mode: max}]: "
        "search=optuna then searches for the Pareto front of all of them (each trial's values at its "
        "last report); results mark the completed trials on that front. ASHA still stops on "
        "sweep.metric and the promoted trial is the best on it.",
    )
    num_samples: int = Field(4, ge=1, description="Trials drawn from the space.")
    search: Literal["random", "optuna"] = Field("random", description="Search algorithm (optuna if installed).")
    seed: int = Field(0, description="Seed of the search algorithm's sampling.")
    grace_period: int = Field(20, ge=1, description="ASHA: steps every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung.")
    max_t: int | None = Field(None, ge=1, description="ASHA: step budget per trial (default: the trial's steps).")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once (default: as many as the cluster's CPUs/GPUs fit)."
    )

    @model_validator(mode="after")
    def _objectives_differ(self) -> SweepConfig:
        names = [self.metric, *(o.metric for o in self.objectives)]
        if len(set(names)) != len(names):
            raise ValueError(
                f"sweep.objectives: each metric once, and not sweep.metric ({self.metric}) again; got {names}"
            )
        return self


class CvConfig(_Section):
    folds: int = Field(5, ge=2, le=20, description="k of k-fold cross-validation (oikyo cv).")
    salt: str = Field("oikyo-cv", min_length=1, description="Salt of the prompt hash that assigns rows to folds.")


MethodType = Literal["lora", "dora", "qlora", "full"]
_ALL_METHODS: list[MethodType] = ["full", "lora", "dora", "qlora"]


class CompareMethodsConfig(_Section):
    methods: list[MethodType] = Field(
        default_factory=lambda: _ALL_METHODS.copy(),
        min_length=1,
        description="Methods `oikyo compare-methods` trains on the same data and step budget (qlora only "
        "where bitsandbytes is installed; skipped with the reason otherwise).",
    )
    lr: dict[MethodType, float] = Field(
        default_factory=dict,
        description="Learning rate per method instead of train.lr, e.g. {full: 1e-4}: full fine-tuning "
        "usually wants a smaller one than adapters.",
    )

    @field_validator("methods")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each method once, got {v}")
        return v


class TrackingConfig(_Section):
    """Experiment trackers the driver logs a run to (tracking/). Where logs go, not what a run
    computes: left out of the config hash, so turning a tracker on keeps `--resume` working."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking server (http(s)://host:port, databricks, or a local sqlite:/file: store): "
        "each run logs its params, per-step metrics, eval report and charts, and its adapter as a registered "
        "model version; registry aliases are mirrored there; sweeps log trials as nested runs. null: off. "
        "Credentials come from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, "
        "never from the URI.",
    )
    mlflow_experiment: str = Field(
        "oikyo", min_length=1, description="MLflow experiment of the runs (created when missing)."
    )
    mlflow_model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="MLflow registered model the run's adapter becomes a version of (null: named like "
        "tracking.mlflow_experiment). `oikyo registry register` and `oikyo deploy` also make it a version of "
        "the registered model named like the oikyo registry model, whose aliases then follow oikyo's.",
    )
    wandb: Literal["off", "offline", "online"] = Field(
        "off",
        description="Weights & Biases: offline writes the run under <run>/wandb/ and sends nothing (upload "
        "later with `wandb sync`); online sends it live (key from WANDB_API_KEY only, server from "
        "WANDB_BASE_URL).",
    )
    wandb_project: str = Field("oikyo", min_length=1, description="W&B project of the runs.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); null: the key's default.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `wandb: off` as false
        if isinstance(data, dict) and data.get("wandb") is False:
            data = {**data, "wandb": "off"}
        return data

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        # the config is written into the run directory (config.yaml) and logged as params: the
        # message must not repeat the URI either
        if v is not None and "@" in v.partition("://")[2].split("/", 1)[0]:
            raise ValueError(
                "holds credentials (user:password@host): remove them and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return v


class OikyoConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data sources and curation.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoint retention and storage."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    run: RunSection = Field(default_factory=RunSection, description="Run directory and naming.")
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="Usage rights: which licences data and base model may have."
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Hyperparameter sweep (oikyo sweep).")
    cv: CvConfig = Field(default_factory=CvConfig, description="k-fold cross-validation (oikyo cv).")
    compare_methods: CompareMethodsConfig = Field(
        default_factory=CompareMethodsConfig, description="Full fine-tuning vs PEFT (oikyo compare-methods)."
    )
    deploy: DeployConfig = Field(
        default_factory=DeployConfig, description="Gated deploys (oikyo deploy): staging load and budgets."
    )
    cost: CostConfig = Field(default_factory=CostConfig, description="Hardware prices, for what runs cost.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Drift checks of captured traffic.")
    retrain: RetrainConfig = Field(
        default_factory=RetrainConfig, description="Retraining from captured traffic (oikyo retrain)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking: MLflow and Weights & Biases."
    )

    @model_validator(mode="after")
    def _objective_fits(self) -> OikyoConfig:
        objective = self.method.objective
        if objective == "sft":
            return self
        if self.data.packing:
            raise ValueError(
                f"data.packing packs single sequences; method.objective={objective} trains on a prompt "
                "with its responses: set data.packing=false"
            )
        if self.data.train_on_prompt:
            raise ValueError(
                f"data.train_on_prompt: method.objective={objective} scores the responses only; "
                "set data.train_on_prompt=false"
            )
        if objective == "kto" and self.data.reject_undesired:
            raise ValueError(
                "data.reject_undesired drops the undesirable rows that method.objective=kto learns from; "
                "set data.reject_undesired=false"
            )
        return self

    def config_hash(self) -> str:
        """Stable hash of every setting except where the run is written and tracked."""
        dump = self.model_dump(mode="json")
        del dump["tracking"]  # where logs go: turning tracking on must not change a run's hash
        dump["run"] = {k: v for k, v in dump["run"].items() if k not in ("root", "name")}
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:12]


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = (
            "unknown field (check the spelling; see `oikyo config --fields`)"
            if e["type"] == "extra_forbidden"
            else e["msg"]
        )
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
                raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
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
    """One line per leaf field: dotted path, default and description (for `oikyo config --fields`)."""
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
