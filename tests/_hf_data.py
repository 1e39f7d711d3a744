"""Byte-level language-modelling data for the HF Trainer tests (no tokenizer download needed)."""

import torch


class ByteLM(torch.utils.data.Dataset):
    """Non-overlapping windows of ``block`` bytes as ``{"input_ids", "labels"}`` (GPT-2 shifts the labels)."""

    def __init__(self, data: torch.Tensor, block: int) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return len(self.data) // self.block

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)  # ends plain iteration (e.g. LengthGroupedSampler's length scan)
        x = self.data[i * self.block:(i + 1) * self.block].long()
        return {"input_ids": x, "labels": x}


class ByteStream(torch.utils.data.IterableDataset):
    """The windows of a :class:`ByteLM` as a stream (an ``IterableDataset``, as in LLM pretraining).

    ``shared=True``: every iterator reads from one shared position (like a socket or a queue), so a
    second reader takes batches away from the first. ``noisy=True``: producing each window draws from
    the global torch RNG (a random one-byte shift, as a random crop would).
    """

    def __init__(self, windows: ByteLM, *, shared: bool = False, noisy: bool = False) -> None:
        self.windows, self.shared, self.noisy = windows, shared, noisy
        self._position = [0]

    def __iter__(self):
        position = self._position if self.shared else [0]
        while position[0] < len(self.windows):
            item = self.windows[position[0]]
            position[0] += 1
            if self.noisy:
                shift = int(torch.randint(0, 2, ()))
                item = {k: v.roll(shift) for k, v in item.items()}
            yield item
