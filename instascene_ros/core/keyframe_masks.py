"""The keyframes' raw 2D instance masks, held compact for the whole session.

A mask arrives as an (H, W) int32 id image (any ids a segmenter chose: small counters, sparse
labels like 1000, 2000, ...), but a view holds a few dozen distinct ids at most. Held as int32
the masks were a third of a keyframe's memory (256 KB of ~880 at 256x256, measured on a live
bench map), and a long-running node keeps every keyframe's. Held here as the view's distinct ids
plus an image of their positions in that list: 1 byte a pixel up to 256 distinct ids, 2 up to
65536, else 4 (the ids themselves). Reading a mask back gives the same int32 image, so every
consumer sees what it always saw.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Iterator

import numpy as np


class _PackedMask:
    __slots__ = ("ids", "codes")

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask)
        if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            raise ValueError(f"a keyframe mask is an (H, W) integer id image, got {mask.dtype} {mask.shape}")
        ids, codes = np.unique(mask.astype(np.int32, copy=False), return_inverse=True)
        for dtype in (np.uint8, np.uint16):
            if ids.size <= np.iinfo(dtype).max + 1:
                self.ids, self.codes = ids, codes.reshape(mask.shape).astype(dtype)
                return
        self.ids, self.codes = None, mask.astype(np.int32)  # a mask of > 65536 ids: as it came

    def unpack(self) -> np.ndarray:
        return self.codes.copy() if self.ids is None else self.ids[self.codes]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + (0 if self.ids is None else self.ids.nbytes)


class KeyframeMasks(MutableMapping):
    """keyframe index -> (H, W) int32 mask, like the dict it replaces; reading gives a fresh
    array (writing into it changes nothing held)."""

    def __init__(self, masks=()):
        self._packed: dict[int, _PackedMask] = {}
        self.update(masks)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._packed[index].unpack()

    def __setitem__(self, index: int, mask: np.ndarray) -> None:
        self._packed[index] = _PackedMask(mask)

    def __delitem__(self, index: int) -> None:
        del self._packed[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"KeyframeMasks({len(self)} masks, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        return sum(packed.nbytes for packed in list(self._packed.values()))
