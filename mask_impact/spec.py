"""The knockout specification: which query positions are blocked from which key positions.

One knockout is ``(keys, queries)`` applied at every layer of a window: every query position in
``queries`` is blocked from every key position in ``keys``. A single token (the classic knockout of
Geva et al. 2023) is ``keys = {p}``, every query; a word, an image region or a whole image is a
larger key set; an information flow (Zhang et al., CVPR 2025: image → last position, question →
last) restricts the queries as well. A position never loses attention to itself, so no attention
row is ever fully masked.

Queries are a set of prompt positions plus, optionally, every position from ``queries_from`` on:
the answer positions of the teacher-forced pass and every token generated under the knockout
belong there (``--block-from answer`` is ``queries_from = answer start``).

This module is the one place that knows which positions a knockout can change
(``first_affected``): the engine recomputes from there, the sweep batches by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Knockout:
    """Block the query positions from the key positions.

    keys:         the key positions knocked out.
    queries:      the prompt positions blocked from them; None: every query position.
    queries_from: with ``queries``, also every position from here on (the answer positions and the
                  tokens generated under the knockout).
    """

    keys: tuple[int, ...]
    queries: tuple[int, ...] | None = None
    queries_from: int | None = None

    def __post_init__(self) -> None:
        positions = list(self.keys) + list(self.queries or ()) + [self.queries_from or 0]
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions):
            raise ValueError(f"knockout positions must be integers >= 0 (got {self})")

    def check_within(self, length: int) -> None:
        """Keys and listed queries are prompt positions (the answer is reached through ``queries_from``)."""
        outside = [p for p in list(self.keys) + list(self.queries or ()) if p >= length]
        if outside:
            raise ValueError(f"knockout position {outside[0]} is past the prompt's {length} positions")

    @classmethod
    def token(cls, position: int) -> Knockout:
        return cls((position,))

    def _query_set(self) -> tuple[tuple[int, ...], int | None]:
        """(listed query positions, first position of the open-ended tail or None)."""
        return ((), 0) if self.queries is None else (self.queries, self.queries_from)

    def restricted_to(self, first_query: int) -> Knockout:
        """Only the queries at positions ``>= first_query`` (``--block-from answer``)."""
        listed, tail = self._query_set()
        tail = None if tail is None else max(tail, first_query)
        return Knockout(self.keys, tuple(q for q in listed if q >= first_query), tail)

    def key_mask(self, length: int) -> torch.Tensor:
        mask = torch.zeros(length, dtype=torch.bool)  # (S,)
        mask[list(self.keys)] = True
        return mask

    def query_mask(self, length: int) -> torch.Tensor:
        """(S,) blocked query positions among the first ``length``; ``query_tail`` says about the rest."""
        listed, tail = self._query_set()
        mask = torch.zeros(length, dtype=torch.bool)
        mask[list(listed)] = True
        if tail is not None:
            mask[tail:] = True
        return mask

    @property
    def query_tail(self) -> bool:
        return self._query_set()[1] is not None

    def first_affected(self, groups: torch.Tensor | None = None) -> int | None:
        """The first position whose computation the knockout can change, or None if it changes nothing.

        Causal attention: a query sees only keys at or before it, so nothing before the first key can
        change (the key's own position is counted, conservatively: it never loses itself). With
        bidirectional image blocks (``groups``: image index per position, -1 elsewhere) a query also
        sees the later keys of its own image. A knockout whose every blocked query could see no key but
        itself (``last->last``) changes nothing.
        """
        if not self.keys:
            return None
        listed, tail = self._query_set()
        lowest = min(self.keys)
        if not self._blocks_a_pair(listed, tail, lowest, groups):
            return None
        candidates = [q for q in listed if q >= lowest]
        if tail is not None:
            candidates.append(max(tail, lowest))
        if groups is not None:
            key_groups = {int(groups[k]) for k in self.keys if k < len(groups) and groups[k] >= 0}
            queries = set(listed)
            for group in key_groups:
                members = (groups == group).nonzero()[:, 0].tolist()
                candidates += [q for q in members if q in queries or (tail is not None and q >= tail)]
        return min(candidates) if candidates else None

    def _blocks_a_pair(self, listed, tail, lowest: int, groups: torch.Tensor | None) -> bool:
        """Whether some blocked query q could attend to some key k != q (the diagonal is never blocked)."""
        if tail is not None or any(q > lowest for q in listed):  # the open tail always reaches past ``lowest``
            return True
        if groups is None:
            return False
        key_groups: dict[int, set[int]] = {}
        for k in self.keys:
            if k < len(groups) and groups[k] >= 0:
                key_groups.setdefault(int(groups[k]), set()).add(k)
        return any(q < len(groups) and key_groups.get(int(groups[q]), set()) - {q} for q in listed)
