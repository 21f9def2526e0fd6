"""Several meta-classifiers read as one: their scores averaged.

One meta-classifier's verdict on a vendor's model moves with the draw of its probe images and
initial stamps (measured: the benign small test-zoo models flagged went from 1 to 3 of 6 between
two draws; docs/experiments.md). The ensemble trains M members, each with its own seed and probe
images, on the same shadows, and reads

    s(f) = (1/M) sum_i s^(i)(f),    s_t(f) = (1/M) sum_i s_t^(i)(f)

so the scan asks the model the members' queries together, in one batch.
"""
from __future__ import annotations

import numpy as np


class MetaEnsemble:
    """The members' queries concatenated, their scores averaged (see the module's equation)."""

    def __init__(self, members: list):
        self.members = list(members)
        self.queries_ = np.concatenate([m.queries_ for m in self.members], 0)
        self._splits = np.cumsum([len(m.queries_) for m in self.members])[:-1]

    def answers_of(self, models: list) -> np.ndarray:
        """The models' answers to every member's queries, concatenated along the query axis."""
        return np.concatenate([m.answers_of(models) for m in self.members], 1)

    def score_answers(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model scores (n,), class scores (n, K)): each member scores its part of the answers, averaged."""
        parts = np.split(np.asarray(probabilities), self._splits, axis=1)
        scored = [m.score_answers(p) for m, p in zip(self.members, parts)]
        return np.mean([s for s, _ in scored], 0), np.mean([c for _, c in scored], 0)

    def state(self) -> dict:
        """Every member's learned arrays, keyed ``<member index>.<name>`` (for saving without pickles)."""
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    @classmethod
    def from_state(cls, state: dict, kind, n_members: int, n_classes: int, hidden: int, scale: float) -> "MetaEnsemble":
        """Rebuild `n_members` members of class `kind` from `state` (see `state`), each with score scale `scale`."""
        members = []
        for i in range(n_members):
            prefix = f"{i}."
            member = kind.from_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                     n_classes, hidden)
            member.scale = scale
            members.append(member)
        return cls(members)
