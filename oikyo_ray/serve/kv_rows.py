"""A running batch's KV cache whose rows can join and leave between decoding steps (Ray-free).

Over transformers' `DynamicCache`: each layer keeps keys/values as [rows, heads, width, dim]
tensors (`layer.keys`, `layer.values`), all rows left-padded to one width, with a 0/1 attention
mask over that width and each row's own next position id. Joining pads the narrower side on the
left with masked zeros; leaving selects rows and cuts the columns no remaining row uses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVRows:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor):
        self.cache, self.mask, self.positions = cache, mask, positions  # mask [rows, width], positions [rows]
        self.layers: list[Any] = list(cache.layers)  # DynamicLayers (checked by prefill)

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    @torch.no_grad()
    def prefill(cls, model, prompts: list[list[int]], pad_id: int, **extra) -> tuple[KVRows, torch.Tensor]:
        """Run the prompts (left-padded) through the model: their rows, and each row's next-token logits."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            # sliding-window, chunked or shared-KV layers keep more state than keys/values: rows of
            # those caches cannot be joined or cut by slicing
            raise NotImplementedError("the continuous engine needs a model whose every layer caches full attention")
        return cls(cache, mask, positions[:, -1] + 1), out.logits[:, -1, :]

    @torch.no_grad()
    def decode(self, model, tokens: list[int], **extra) -> torch.Tensor:
        """Feed each row its last token; the next-token logits per row."""
        ids = torch.tensor(tokens, device=self.mask.device)[:, None]
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
            **extra,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def join(self, other: KVRows) -> None:
        """Append `other`'s rows after these (both sides left-padded to the wider one)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, and only the columns some of them attend to."""
        idx = torch.tensor(rows, device=self.mask.device)
        self.mask, self.positions = self.mask[idx], self.positions[idx]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, width - kv.shape[-2], 0))  # [rows, heads, width, dim]: zeros, masked out


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))
