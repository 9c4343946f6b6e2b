"""Sample packing: tokenised rows -> fixed-length blocks with per-sample position ids (Ray-free).

Rows are placed best-fit-decreasing into blocks of `length` tokens; the tail of a block is
padding (label -100). Each sample's position ids restart at 0, which is how the model tells the
samples apart: transformers builds a block-diagonal causal mask from restarting position ids when
no attention mask is passed (`masking_utils.find_packed_sequence_indices`), on every attention
implementation: flash-attention uses them as variable-length boundaries, sdpa and eager (what
runs on CPU) get a dense block-diagonal mask, so packed samples never attend to each other, at
the cost of an L x L mask per block. A sample's first label is masked too: it would otherwise be
predicted from the previous sample's last token.

`pack_files` packs a prepared train split's parts into the ``train_packed`` split (one call per
part, so the blocks do not depend on scheduling); `packing_report` is its manifest entry.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from oikyo_ray.data.columns import blocks_column, list_rows
from oikyo_ray.data.manifest import PACKED
from oikyo_ray.data.prepared import TRAIN_COLUMNS, read_column
from oikyo_ray.data.tokenize import IGNORE

PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "num_tokens"]


def plan_blocks(lengths: list[int], length: int) -> list[list[int]]:
    """Indices of the rows in each block: best-fit decreasing (ties kept in input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, block index), sorted
    for i in order:
        n = lengths[i]
        if n > length:
            raise ValueError(f"a row of {n} tokens does not fit a packed block of {length}")
        j = bisect.bisect_left(free, (n, -1))  # the tightest block that still fits
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = length, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return blocks


def pack_rows(input_ids: list, labels: list, length: int, pad_id: int) -> dict[str, list]:
    """Pack rows (lists of token ids and labels) into blocks of exactly `length` tokens.

    Returns columns PACKED_COLUMNS: ids, labels, position ids (restarting per sample; the padding
    tail counts as one more sequence) and the number of real tokens per block."""
    lengths = [len(x) for x in input_ids]
    out: dict[str, list] = {c: [] for c in PACKED_COLUMNS}
    for block in plan_blocks(lengths, length):
        ids = np.full(length, pad_id, dtype=np.int64)
        lab = np.full(length, IGNORE, dtype=np.int64)
        pos = np.zeros(length, dtype=np.int64)
        at = 0
        for i in block:
            n = lengths[i]
            ids[at : at + n] = input_ids[i]
            lab[at : at + n] = labels[i]
            lab[at] = IGNORE
            pos[at : at + n] = np.arange(n)
            at += n
        pos[at:] = np.arange(length - at)
        out["input_ids"].append(ids)
        out["labels"].append(lab)
        out["position_ids"].append(pos)
        out["num_tokens"].append(at)
    return out


def efficiency(num_tokens: list[int], length: int) -> float:
    """Share of real (non-pad) tokens in packed blocks of `length`."""
    return float(sum(num_tokens)) / (len(num_tokens) * length) if num_tokens else 0.0


def padded_efficiency(lengths: list[int], batch_size: int) -> float:
    """Share of real tokens when the same rows, in order, are right-padded per batch to the
    longest row (what an unpacked loader feeds the model)."""
    real = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return real / padded if padded else 0.0


def pack_files(batch: dict, length: int, pad_id: int) -> dict:
    """Packs each train part (`src`) into blocks written to `dst` (a map UDF over parts)."""
    for src, dst in zip(batch["src"], batch["dst"]):
        t = pq.read_table(src, columns=TRAIN_COLUMNS)
        cols = pack_rows(list_rows(t["input_ids"]), list_rows(t["labels"]), length, pad_id)
        pq.write_table(
            pa.table(
                {
                    k: pa.array(v, type=pa.int64()) if k == "num_tokens" else blocks_column(v, length)
                    for k, v in cols.items()
                }
            ),
            dst,
        )
    return {"dst": list(batch["dst"])}


def packing_report(out_dir: Path, length: int, batch_size: int, seed: int) -> dict:
    """Blocks, rows and the non-pad token share packed vs right-padded batches of the same rows
    (shuffled with the training seed, as the loader would)."""
    blocks, rows = read_column(out_dir, PACKED, "num_tokens"), read_column(out_dir, "train", "num_tokens")
    shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    return {
        "length": length,
        "rows": len(rows),
        "blocks": len(blocks),
        "efficiency": round(efficiency(blocks, length), 4),
        "padded_efficiency": round(padded_efficiency(shuffled, batch_size), 4),
        "padded_batch_size": batch_size,
    }
