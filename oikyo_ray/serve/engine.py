"""The transformers+peft engine: one base model, named adapters, chat/completion calls (Ray-free)."""

from __future__ import annotations

import threading
from pathlib import Path

from oikyo_ray.config import ModelConfig
from oikyo_ray.errors import OikyoError


class UnknownModel(OikyoError):
    """The requested model name is neither the base nor a loaded adapter."""


def check_adapter_dir(path: str | Path) -> Path:
    """An adapter dir must hold adapter_config.json and safetensors weights (never pickles)."""
    p = Path(path).expanduser().resolve()
    if not (p / "adapter_config.json").is_file():
        raise OikyoError(f"{p} is not an adapter directory (no adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        raise OikyoError(f"{p} has no adapter_model.safetensors; only safetensors adapters are served")
    return p


class Engine:
    """Holds the base model and adapters; generation is serialised by a lock (one model copy)."""

    def __init__(self, model_cfg: ModelConfig, model_path: str, adapters: dict[str, str], base_name: str = "base"):
        from oikyo_ray.model.load import load_model, load_tokenizer

        self.base_name = base_name
        self.tokenizer = load_tokenizer(model_cfg, model_path)
        self.model = load_model(model_cfg, model_path)
        self.model.eval()
        self.adapters: list[str] = []
        self._lock = threading.Lock()
        for name, path in adapters.items():
            self.add_adapter(name, path)

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        p = check_adapter_dir(path)
        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, str(p), adapter_name=name)
        else:
            self.model.load_adapter(str(p), adapter_name=name)
        self.model.eval()
        self.adapters.append(name)

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def render_chat(self, messages: list[dict]) -> str:
        from oikyo_ray.data.tokenize import render_prompt

        return render_prompt(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, model: str, prompts: list[str], **sampling) -> list[dict]:
        from oikyo_ray.eval.generate import generate

        if model not in self.model_names():
            raise UnknownModel(f"model '{model}' not found; available: {self.model_names()}")
        with self._lock:
            if model == self.base_name:
                if self.adapters:
                    with self.model.disable_adapter():
                        return generate(self.model, self.tokenizer, prompts, **sampling)
                return generate(self.model, self.tokenizer, prompts, **sampling)
            self.model.set_adapter(model)
            return generate(self.model, self.tokenizer, prompts, **sampling)
