"""Time models fitted on this path, for the downtime prediction (docs/architecture.md §4 "fixed costs
measured on this path").

``CostModel`` fits ``seconds ~= bytes * per_byte + items * per_item`` over recent samples.
Two things in stop-and-copy cost time per item as well as per byte: sending RAM (each
stream record has framing, a checksum table and the receiver's bookkeeping, so a final
pass of many scattered pages takes longer than its bytes say) and re-hashing it for the
content digests (one kernel call per run). The RAM sender and the digests feed their
measurements in; the source session predicts with the fitted numbers.
"""

from __future__ import annotations

import numpy as np

#: what one item is assumed to cost before the samples separate per-byte from per-item
#: cost: a piece of a pass in a RAM record of its own (framing, a checksum table, the
#: receiver's bookkeeping)
RECORD_PRIOR_S = 40e-6


class CostModel:
    """``seconds ~= bytes * per_byte + items * per_item``, fitted by least squares over
    recent samples (older ones decay), with ``per_item`` >= 0. Sending RAM costs time per
    byte (the link) and per record (framing, checksum tables, the receiver's bookkeeping):
    a final pass of many scattered pages takes longer than its bytes say, so the
    prediction counts both (docs/architecture.md §4 "fixed costs measured on this path")."""

    def __init__(self, prior_per_item_s: float = RECORD_PRIOR_S, decay: float = 0.9) -> None:
        self.prior = prior_per_item_s
        self.decay = decay
        self._s = np.zeros(5)           # sum bb, bi, ii, bt, it
        self.samples = 0

    def add(self, nbytes: int, items: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 0 or items < 0:
            return
        self._s *= self.decay
        self._s += (nbytes * nbytes, nbytes * items, items * items, nbytes * seconds,
                    items * seconds)
        self.samples += 1

    def fit(self) -> tuple[float, float]:
        """(per_byte_s, per_item_s); per_byte 0 before any sample."""
        bb, bi, ii, bt, it = (float(x) for x in self._s)
        if bb <= 0:
            return 0.0, self.prior
        det = bb * ii - bi * bi
        if self.samples >= 3 and det > 1e-2 * bb * ii:
            per_byte = (bt * ii - bi * it) / det
            per_item = (bb * it - bi * bt) / det
            if per_byte > 0 and per_item >= 0:
                return per_byte, per_item
        # too little spread between samples to separate the two: assume the prior per item
        per_item = self.prior
        per_byte = max(0.0, (bt - per_item * bi) / bb)
        if per_byte == 0.0:
            per_item = it / ii if ii > 0 else self.prior
        return per_byte, per_item


def records_for(counts: np.ndarray, record_pages: int) -> int:
    """The pieces a list of runs becomes in the stream (each run cut at ``record_pages``):
    the unit of per-item cost. A piece travels in a RAM record of its own or, when short,
    in a RAM_RUNS record with others (``stream.ram_framing``); either way each costs both
    ends a receive or a send, a CRC-table call and the digests' bookkeeping."""
    return int((-(-counts // record_pages)).sum()) if counts.size else 0
