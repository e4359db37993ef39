"""In which order a batch's requests may be applied: waves that keep each device's order.

Pure: no I/O. A batch is applied in waves; the requests of one wave run together, the waves
one after the other. Each request claims some keys (a session, a record, ...), each claim
with a label: two requests whose claims share a key but not the label must run in arrival
order (the later one in a later wave); with the same label they may share a wave (record
creates of one session go to the store together, which keeps their order itself). A request
whose label is unique to it thus runs alone on that key, after everything before it; a read
(label ``READ``) runs after everything before it and holds nothing back.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

Claim = tuple[Hashable, Hashable]  # (key, label)

# The label of a read (a get, a check): it comes after everything sent before it on its key,
# but what is sent after it need not wait for it (it may see that too).
READ = None


def waves(claims: Sequence[Iterable[Claim]]) -> list[int]:
    """The wave (0, 1, ...) of each request, given in arrival order with its claims.

    A request goes to the earliest wave that comes after every earlier request it conflicts
    with, and no earlier than the requests with its label on its keys.
    """
    last: dict[Hashable, dict[Hashable, int]] = {}
    out: list[int] = []
    for request_claims in claims:
        mine = list(request_claims)
        wave = 0
        for key, label in mine:
            for other, seen in last.get(key, {}).items():
                wave = max(wave, seen if other == label and label is not READ else seen + 1)
        for key, label in mine:
            if label is not READ:  # a read holds nothing back
                labels = last.setdefault(key, {})
                labels[label] = max(labels.get(label, 0), wave)
        out.append(wave)
    return out


def group(wave_of: Sequence[int]) -> list[list[int]]:
    """The requests' indexes per wave, each wave in arrival order."""
    grouped: list[list[int]] = [[] for _ in range(max(wave_of, default=-1) + 1)]
    for i, w in enumerate(wave_of):
        grouped[w].append(i)
    return grouped
