"""Query-tuned meta-classifier (MNTD, Xu et al., S&P'21), with a per-class target head.

A model f is represented by its class probabilities on a small set of learned inputs
Q = sigmoid(theta) in [0, 1]^(m x C x H x W): the feature vector is

    phi(f) = vec(f(q_1), ..., f(q_m))            (m x K probabilities)

and an MLP h reads it: one hidden layer (ReLU) and two heads,

    s(f)   = w_s . relu(W phi(f) + b) + c_s        model score (trojaned vs benign, a logit)
    s_t(f) = (W_t relu(W phi(f) + b) + c_t)_t      per class t: "t is an attack target" (logits)

Q and h are trained *jointly* on the shadow pool (the shadows are differentiable torch models,
frozen) by minimising

    L = BCE(s(f), trojaned(f)) + lambda * mean_t BCE(s_t(f), [t in targets(f)])

with Adam. At scan time Q is sent to the ONNX model once (m queries) and h reads the answers:
the scan needs no gradients and no data, and the same calibration gives the same answer every
time. Higher scores mean more trojan-like.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


class _Meta(nn.Module):
    def __init__(self, in_shape, n_classes: int, n_queries: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.theta = nn.Parameter(torch.randn((n_queries,) + tuple(in_shape), generator=gen))
        self.body = nn.Sequential(nn.Linear(n_queries * n_classes, hidden), nn.ReLU())
        self.model_head = nn.Linear(hidden, 1)
        self.class_head = nn.Linear(hidden, n_classes)

    def queries(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)

    def forward(self, probabilities: torch.Tensor):
        z = self.body(probabilities.flatten(1))
        return self.model_head(z)[:, 0], self.class_head(z)


def seeded(seed: int) -> torch.Generator:
    """torch's global seed and a generator of the same seed (initial queries, weights, shadow order)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_jointly(net: nn.Module, score, models: list, trojaned, targets, settings, gen) -> list:
    """Adam on L = BCE(s, trojaned) + lambda mean_t BCE(s_t, targets) over the frozen shadow `models`,
    `settings.batch` shadows a step for `settings.epochs` epochs; `score(models)` -> (s, s_t) runs the
    learned queries through them. Returns the mean loss per epoch."""
    trojaned = torch.as_tensor(np.asarray(trojaned, np.float32))
    targets = torch.as_tensor(np.asarray(targets, np.float32))
    for m in models:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    bce = nn.functional.binary_cross_entropy_with_logits
    n, losses = len(models), []
    for _ in tqdm(range(settings.epochs), desc="meta-classifier", disable=not settings.progress):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, settings.batch):
            b = perm[i:i + settings.batch]
            s, s_t = score([models[j] for j in b])
            loss = bce(s, trojaned[b]) + settings.target_weight * bce(s_t, targets[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / n)
    return losses


class QueryMetaClassifier:
    """MNTD meta-classifier with jointly tuned queries (see the module's equations).

    Parameters
    ----------
    n_queries : int
        m, the number of learned query inputs (MNTD uses 10).
    hidden : int
        Width of the MLP's hidden layer.
    epochs : int
        Passes over the shadow pool.
    lr : float
        Adam's learning rate for queries and MLP.
    target_weight : float
        lambda, the weight of the per-class target loss.
    batch : int
        Shadows per optimisation step.
    seed : int
        Seed of the initial queries, the MLP and the shadow order.
    """

    def __init__(self, n_queries: int = 10, hidden: int = 32, epochs: int = 60, lr: float = 1e-2,
                 target_weight: float = 1.0, batch: int = 8, seed: int = 0, progress: bool = True):
        self.n_queries = n_queries
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.target_weight = target_weight
        self.batch = batch
        self.seed = seed
        self.progress = progress

    @staticmethod
    def _answers(models, q: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(q), dim=1) for m in models])

    def fit(self, models: list, trojaned, targets, in_shape) -> "QueryMetaClassifier":
        """Train on shadow models (torch, logits) taking inputs of `in_shape` (C, H, W), their labels
        (n,) and target indicators (n, K)."""
        gen = seeded(self.seed)
        self.in_shape_ = tuple(int(v) for v in in_shape)
        self.n_classes_ = int(np.shape(targets)[1])
        net = _Meta(self.in_shape_, self.n_classes_, self.n_queries, self.hidden, gen)
        self.loss_ = train_jointly(net, lambda batch: net(self._answers(batch, net.queries())), models, trojaned,
                                   targets, self, gen)
        self.net_ = net.eval()
        self.queries_ = net.queries().detach().numpy().astype(np.float32)
        return self

    def score_answers(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model scores (n,), class scores (n, K)) for answers (n, m, K) of n models to the queries."""
        with torch.no_grad():
            s, s_t = self.net_(torch.as_tensor(np.asarray(probabilities, np.float32)))
        return s.numpy().astype(np.float64), s_t.numpy().astype(np.float64)

    def answers_of(self, models: list) -> np.ndarray:
        """The shadows' answers (n, m, K) to the learned queries."""
        with torch.no_grad():
            return self._answers(models, torch.from_numpy(self.queries_)).numpy()

    def state(self) -> dict:
        """Every learned array by name (for saving without pickles)."""
        return {"queries": self.queries_, **{k: v.detach().numpy() for k, v in self.net_.state_dict().items()
                                             if k != "theta"}}

    @classmethod
    def from_state(cls, state: dict, n_classes: int, hidden: int) -> "QueryMetaClassifier":
        """A fitted meta-classifier rebuilt from `state` (see `state`) for `n_classes` classes and width `hidden`."""
        queries = np.asarray(state["queries"], np.float32)
        meta = cls(n_queries=len(queries), hidden=hidden)
        net = _Meta(queries.shape[1:], n_classes, len(queries), hidden, torch.Generator().manual_seed(0))
        weights = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items() if k != "queries"}
        weights["theta"] = torch.logit(torch.as_tensor(queries).clamp(1e-6, 1 - 1e-6))
        net.load_state_dict(weights)
        meta.net_, meta.queries_, meta.n_classes_, meta.in_shape_ = net.eval(), queries, n_classes, queries.shape[1:]
        return meta
