"""Micro-batches: padded rows, or one padding-free row of concatenated samples; bin packing.

A sample is ``{"input_ids": list[int], "labels": list[int]}`` with labels aligned to input_ids and
-100 where a token is not trained (the loss shifts; see ``finetune.train.losses``).

Two layouts:
- ``collate_padded``: (num_samples, longest) rows, right padding, an attention_mask.
- ``collate_flat`` (padding-free): every sample of the micro-batch in ONE row (batch dim 1),
  position_ids restarting at 0 per sample, and the cumulative sequence lengths under the names
  transformers 5 passes down to attention functions (``cu_seq_lens_q/k``, ``max_length_q/k``), so
  ``flash_attention_2/3`` and ``finetune_varlen`` (``finetune.train.attention``) need no recomputation.
  No compute is spent on padding; attention must not cross samples (``enable_packed_attention``).

Both layouts set the label of each sample's FIRST token to -100. In a flat row that token's label
would otherwise be predicted from the previous sample's last token; the first token of a sample is
never a target of its own sample, so the loss and the token count are the same in both layouts.

``pack_bins`` groups samples into rows of at most max_length tokens (best-fit decreasing) for
fixed-size packed rows; the caller truncates or drops over-long samples first. ``pack_stream`` does
it on a stream of lengths with a bounded buffer (``data.packing_buffer``), and ``PackedRows`` serves
the rows of any sequence of samples without copying them.
"""

from __future__ import annotations

import bisect
import dataclasses
from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from finetune.data.cache import Rows
from finetune.train.losses import IGNORE_INDEX, count_trained_tokens


@dataclasses.dataclass
class Batch:
    """One micro-batch. attention_mask is None for the flat (padding-free) layout."""

    input_ids: torch.Tensor  # (rows, time) long
    labels: torch.Tensor  # (rows, time) long, -100 where not trained
    position_ids: torch.Tensor  # (rows, time) long
    attention_mask: torch.Tensor | None  # (rows, time) long 1/0, or None when flat
    seq_lens: list[int]  # tokens of each sample, in order
    cu_seq_lens: torch.Tensor | None = None  # (num_samples + 1,) int32 offsets, flat only
    max_seq_len: int | None = None  # longest sample, flat only

    @property
    def num_samples(self) -> int:
        return len(self.seq_lens)

    @property
    def is_flat(self) -> bool:
        return self.attention_mask is None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens, what tokens/s reports."""
        return sum(self.seq_lens)

    @property
    def num_trained_tokens(self) -> int:
        """Tokens the loss sums over; the engine divides the step's summed loss by their total."""
        return count_trained_tokens(self.labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            attention_mask=move(self.attention_mask),
            cu_seq_lens=move(self.cu_seq_lens),
        )

    def model_inputs(self) -> dict:
        """kwargs for ``model(**...)``: no labels (the engine computes the loss itself).

        use_cache=False: training needs no KV cache, and with a cache transformers stops reading
        packed samples from position_ids when it builds sdpa/eager masks.
        """
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.cu_seq_lens is not None:
            inputs |= {
                "cu_seq_lens_q": self.cu_seq_lens,
                "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_seq_len,
                "max_length_k": self.max_seq_len,
            }
        return inputs


def _checked(samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs, with the first label masked (see the module docstring)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    pairs = []
    for i, sample in enumerate(samples):
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        if not ids or len(ids) != len(labels):
            raise ValueError(f"sample {i}: needs >= 1 token and len(labels) == len(input_ids), "
                             f"got {len(ids)} ids and {len(labels)} labels")
        pairs.append((ids, [IGNORE_INDEX] + labels[1:]))
    return pairs


def collate_padded(samples: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """Right-padded rows: padding has attention_mask 0 and labels -100."""
    pairs = _checked(samples)
    lens = [len(ids) for ids, _ in pairs]
    width = max(lens)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    # Right padding: the real tokens of every row sit at positions 0..len-1, as when alone.
    position_ids = torch.arange(width).expand(len(pairs), width).clone()
    return Batch(input_ids, labels, position_ids, attention_mask, lens)


def collate_flat(samples: list[dict]) -> Batch:
    """All samples in one row (batch dim 1), position_ids restarting at 0 per sample."""
    pairs = _checked(samples)
    lens = [len(ids) for ids, _ in pairs]
    input_ids = torch.tensor([tok for ids, _ in pairs for tok in ids], dtype=torch.long)[None]
    labels = torch.tensor([lab for _, labs in pairs for lab in labs], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    # int32 is what FlashAttention varlen kernels take.
    cu_seq_lens = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Batch(input_ids, labels, position_ids, None, lens, cu_seq_lens, max(lens))


def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing packing of sample indices into bins of at most max_length tokens.

    Longest first; each sample goes to the open bin it fills most tightly, else to a new bin.
    Deterministic (ties go to the lower index / the older bin). O(n log n) searches.
    Like first-fit decreasing it needs at most about 11/9 of the optimal number of bins
    (Johnson, 1973).
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"sample {i} has {n} tokens; each must be 1..max_length={max_length} "
                             f"(truncate or drop samples before packing)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))  # tightest bin with room for sample i
        if at == len(free):
            bins.append([i])
            remaining, b = max_length - lengths[i], len(bins) - 1
        else:
            remaining, b = free.pop(at)
            bins[b].append(i)
            remaining -= lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def packing_efficiency(bins: list[list[int]], lengths: list[int], max_length: int) -> float:
    """Fraction of the bins' max_length slots filled with real tokens (1.0 = no padding)."""
    if not bins:
        return 0.0
    used = sum(lengths[i] for b in bins for i in b)
    return used / (len(bins) * max_length)


def pack_stream(lengths: Iterable[int], max_length: int, buffer: int) -> Iterator[list[int]]:
    """pack_bins over a stream of sample lengths, `buffer` samples at a time: each window's bins, with
    indices counted over the whole stream. At most `buffer` lengths are held; a stream that fits one
    buffer gets exactly pack_bins' bins."""
    window: list[int] = []
    start = 0
    for n in lengths:
        window.append(int(n))
        if len(window) == buffer:
            yield from ([start + i for i in b] for b in pack_bins(window, max_length))
            start, window = start + len(window), []
    if window:
        yield from ([start + i for i in b] for b in pack_bins(window, max_length))


class PackedRows(Rows):
    """Packed rows (lists of samples) over a sequence of samples: the bins kept as two flat arrays."""

    def __init__(self, samples: Sequence, bins: Iterable[list[int]]) -> None:
        order, sizes = array("q"), array("q")  # 8 bytes an entry, not a Python int each
        for b in bins:
            order.extend(b)
            sizes.append(len(b))
        self.samples = samples
        self.order = np.array(order, dtype=np.int64)
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(np.array(sizes, dtype=np.int64), out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _row(self, i: int):
        return [self.samples[int(k)] for k in self.order[self.offsets[i]:self.offsets[i + 1]]]
