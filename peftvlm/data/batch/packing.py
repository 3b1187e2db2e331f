"""Padding-free packing (`train.packing`) and length-grouped batching (`train.group_by_length`).

With `train.packing`, the training set becomes a set of bins: each bin is a few conversations
whose token lengths (the cached `length` column) add up to at most `train.max_length`, filled
best fit decreasing as TRL's `pack_dataset` fills text rows (`best_fit_decreasing`). A bin is
one training item, so `per_device_train_batch_size` keeps its Hugging Face meaning: packed rows
per step, each of up to `max_length` tokens; the trainer's own sampler shuffles the bins every
epoch from `train.seed`, shards them across processes, skips them on resume and counts them for
`len(dataloader)` (so epochs, `max_steps` and gradient accumulation work unchanged).

`PackedCollator` encodes a batch's conversations with the training collator (assistant-only
labels and all), then lays each bin's conversations end to end in one row with its padding
removed: `position_ids` restart at 0 for each conversation and no `attention_mask` is passed.
transformers reads conversation boundaries from those positions: on CPU/SDPA/eager it builds a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), with flash-attention
it takes the varlen path. So no token attends across conversations and each token sees the
positions it would see alone. Families with multimodal rotary positions (Qwen-VL's 3-D M-RoPE)
give each conversation's own positions through `FamilySpec.packed_positions`; they ride behind
the text positions as transformers' 4-row `position_ids`. The first token of each conversation
gets label -100, so nothing is trained to predict it from the previous conversation (unpacked,
it is never predicted either). Rows shorter than the batch's longest bin are padded at the end
with a block of their own (labels -100). Images stay in bin order, which is the order of their
placeholder tokens in the packed rows.

TRL refuses packing for image data, and its `pack_dataset` / transformers'
`DataCollatorWithFlattening` work on pre-tokenised rows without images; here rows are packed by
their counted lengths before any image is decoded, hence this small layer of our own.
"""

from __future__ import annotations

from collections import defaultdict

from peftvlm.data.batch.collate import IGNORE_INDEX
from peftvlm.data.prepare.table import decode_row
from peftvlm.errors import DataError


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens: longest first, each
    goes into the bin with the least room that still fits it (a new bin when none does).

    The same strategy as TRL's `_pack_bfd`, which needs token-id columns; this works on lengths
    alone. A max-tree over free-space values 1..capacity finds the best-fitting bin in
    O(log capacity) (about a second per 100k rows). Deterministic: ties keep row order.
    """
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        worst = int(lengths.max() if lengths.max() > capacity else lengths.min())
        raise DataError(f"train.packing: a row of {worst} tokens cannot be packed into bins of "
                        f"{capacity} tokens (train.max_length)",
                        hint="rows longer than train.max_length are dropped before packing; "
                             "this is a bug if you see it")
    size = 1 << capacity.bit_length()
    tree = [0] * (2 * size)  # tree[size + s] = s while some bin has s tokens free; parents: max
    bins: list[list[int]] = []
    with_room: dict[int, list[int]] = defaultdict(list)  # free tokens -> bins with that much

    def mark(space: int, value: int) -> None:
        node = size + space
        tree[node] = value
        while node > 1:
            node //= 2
            tree[node] = max(tree[2 * node], tree[2 * node + 1])

    sizes = lengths.tolist()
    for index in np.argsort(-lengths, kind="stable").tolist():
        need = sizes[index]
        if tree[1] < need:  # no bin has room: a new one
            bins.append([index])
            space, target = capacity - need, len(bins) - 1
        else:  # the leftmost free-space leaf >= need: the tightest fit
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= need else 2 * node + 1
            free = node - size
            target = with_room[free].pop()
            if not with_room[free]:
                mark(free, 0)
            bins[target].append(index)
            space = free - need
        if space:
            if not with_room[space]:  # already marked while some bin has this much room
                mark(space, space)
            with_room[space].append(target)
    return bins


BIN_KEY = "packed_rows"  # a training item's key for the rows of its bin


class PackedRows:
    """The training set as bins: `bins[i]` lists the rows packed into row `i`, `lengths[i]` is
    its token count, and `dataset` is what the trainer reads: one item per bin,
    `{"packed_rows": [row, ...]}`, decoded from the Arrow rows a batch at a time."""

    def __init__(self, rows, capacity: int):
        self.rows, self.capacity = rows, capacity
        row_lengths = rows.lengths()  # the cached `length` column (table.Rows)
        self.bins = best_fit_decreasing(row_lengths, capacity)
        self.lengths = [int(row_lengths[b].sum()) for b in self.bins]

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def dataset(self):
        import datasets

        return datasets.Dataset.from_dict({"bin": self.bins}).with_transform(self.decode)

    def decode(self, batch: dict) -> dict:
        """`datasets` transform: bins of row indices -> their decoded rows (one Arrow read)."""
        records = self.rows.table[[i for b in batch["bin"] for i in b]]
        rows = iter(decode_row({"row": text, "images": images})
                    for text, images in zip(records["row"], records["images"]))
        return {BIN_KEY: [[next(rows) for _ in b] for b in batch["bin"]]}


def _packed(chunks: list, fill: int):
    """Per-bin 1-D token tensors -> (bins, longest), right-filled with `fill`."""
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence(chunks, batch_first=True, padding_value=fill)


def pack_batch(batch: dict, bin_sizes: list[int] | None = None, rope_positions=None,
               pad_id: int = 0) -> dict:
    """A right-padded batch of conversations -> padding-free packed rows: the first
    `bin_sizes[0]` conversations in row 0, the next `bin_sizes[1]` in row 1, ... (default: all
    in one row). `rope_positions` ((k, conversations, tokens), e.g. Qwen-VL's 3-D M-RoPE of each
    conversation alone) go behind the text positions as (1 + k, rows, tokens) `position_ids`."""
    import torch

    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    bin_sizes = bin_sizes or [len(lengths)]
    tokens_per_bin = [int(n) for n in torch.stack([s.sum() for s in lengths.split(bin_sizes)])]
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    longest = max(tokens_per_bin)
    # each row's tail restarts at 0: a block of its own that no conversation token attends to
    tails = [torch.arange(longest - n) for n in tokens_per_bin]

    def per_row(flat, tail_of):
        return [torch.cat([part, tail_of(i)]) for i, part in
                enumerate(flat.split(tokens_per_bin))]

    packed = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        per_token = isinstance(value, torch.Tensor) and value.dim() == 2 and \
            value.shape == mask.shape
        fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
        packed[key] = _packed(value[mask].split(tokens_per_bin), fill) if per_token else value
    text = torch.stack(per_row(positions, lambda i: tails[i]))
    if rope_positions is None:
        packed["position_ids"] = text
    else:
        rope = rope_positions[:, mask]  # (k, packed tokens), conversations in batch order
        packed["position_ids"] = torch.stack(
            [text] + [torch.stack(per_row(axis, lambda i: tails[i])) for axis in rope])
    if "labels" in packed:
        starts = torch.cumsum(lengths, 0) - lengths  # conversation starts in the flat order
        row_of = torch.repeat_interleave(torch.arange(len(bin_sizes)), torch.tensor(bin_sizes))
        row_start = torch.tensor([0] + tokens_per_bin[:-1]).cumsum(0)[row_of]
        packed["labels"][row_of, starts - row_start] = IGNORE_INDEX
    return packed


class PackedCollator:
    """The training collator, then `pack_batch`: a batch of bins as packed rows, one per bin.

    Items are `PackedRows.dataset` items; a bare row counts as a bin of one (`data.mixed`
    collates its blank image so).
    `model` gives families with multimodal rotary positions (`FamilySpec.packed_positions`)
    what they need to compute each conversation's own positions (the model's config/method).
    """

    def __init__(self, collator, model=None):
        self.collator, self.model = collator, model
        self.processor, self.family = collator.processor, collator.family

    def __call__(self, items: list) -> dict:
        bins = [item[BIN_KEY] if BIN_KEY in item else [item] for item in items]
        batch = self.collator([row for rows in bins for row in rows])
        hook = self.family.packed_positions
        rope = hook(self.model, batch) if hook is not None else None
        pad_id = self.processor.tokenizer.pad_token_id or 0
        return pack_batch(batch, [len(rows) for rows in bins], rope, pad_id)


def describe_bins(items: PackedRows) -> str:
    """One log line: how many rows went into how many bins, and how full the bins are."""
    rows, tokens = sum(len(b) for b in items.bins), sum(items.lengths)
    fill = tokens / (len(items) * items.capacity) if len(items) else 0.0
    return (f"packing: {rows} rows in {len(items)} packed rows of at most {items.capacity} "
            f"tokens ({fill:.0%} full, {rows / max(len(items), 1):.1f} conversations each)")


def train_collator(collator, packing: bool, model=None):
    return PackedCollator(collator, model) if packing else collator


def train_items(rows, packing: bool, max_length: int):
    """What the trainer iterates: the rows, or with packing their bins (`PackedRows`)."""
    return PackedRows(rows, max_length) if packing else rows


# `train.group_by_length` unset: group when random batches would pad this share or more of
# their token slots (estimated from the cached lengths as 1 - mean / max of each batch).
AUTO_GROUP_PADDING = 0.10


def random_batch_padding(lengths, batch_size: int, seed: int = 0) -> float:
    """Share of token slots random batches of `batch_size` rows spend on padding (each batch
    padded to its longest row), over one seeded shuffle of `lengths`."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) < 2 or batch_size < 2:
        return 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))
    slots = real = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start:start + batch_size]]
        slots += int(batch.max()) * len(batch)
        real += int(batch.sum())
    return 1 - real / max(slots, 1)


def group_by_default(lengths, batch_size: int) -> bool:
    """What `train.group_by_length` left unset means: group when the rows' lengths vary enough
    that random batches would pad `AUTO_GROUP_PADDING` of their slots (docs/benchmarks.md)."""
    return bool(lengths) and random_batch_padding(lengths, batch_size) >= AUTO_GROUP_PADDING


def seeded_length_grouped_sampler(batch_size: int, lengths, seed: int):
    """transformers' `LengthGroupedSampler` (mega-batches of 50 batches, sorted by length
    inside, longest batch first) drawing from its own generator, reseeded from `seed` and the
    epoch on `set_epoch` (the trainer calls it every epoch, resumed runs included). The stock
    one draws from the global RNG when iterated, which a resumed run restores to the
    checkpoint's step, not to the epoch's start: its order would differ from the interrupted
    run's, and skipping the trained batches would skip other rows."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(seed + epoch)

    sampler = SeededLengthGroupedSampler(batch_size, lengths=list(lengths),
                                         generator=torch.Generator().manual_seed(seed))
    return sampler
