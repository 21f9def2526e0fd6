"""Query-tuned *stamp* probes: MNTD's jointly learned queries, shaped as triggers on held-out images.

MNTD (Xu et al., S&P'21) learns free-form query inputs. A trojan, though, is a stamp on natural
images that moves them to a target class; this meta-classifier therefore learns P stamps
(opacity a_j = sigmoid(m_j) in [0, 1]^(H x W), pattern p_j = sigmoid(r_j) in [0, 1]^(C x H x W))
and applies each to B fixed held-out images x_b:

    q_jb = (1 - a_j) * x_b + a_j * p_j            (j = 0 is the identity: the clean images)

A model f answers the (P + 1) * B queries once. For every class t the features are, per probe j,

    mass_jt  = mean_b f(q_jb)_t                    (probability the probe sends to t)
    moved_jt = mean_{b : y_b != t} f(q_jb)_t       (from images of other classes)
    own_j    = mean_b f(q_jb)_{y_b}                (what is left for each image's own label)

and one MLP g, shared by all classes (a trojan's target can be any class), reads them:
s_t = g(mass_.t, moved_.t, own_.) is the target score of class t and s = logsumexp_t s_t the
model's score. The stamps and g are trained jointly on the shadow pool (frozen torch models) by

    L = BCE(s, trojaned) + lambda * mean_t BCE(s_t, [t in targets])

Higher scores mean more trojan-like. At scan time the model answers (P + 1) * B queries.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .meta import seeded, train_jointly


def standardised(p: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * (l - mean l) / std l), l = log p per answer row: a model and any temperature-scaled
    copy of it give the same answers (vendors' models are more confident than shadows)."""
    lg = torch.log(p.clamp(min=1e-12))
    z = (lg - lg.mean(-1, keepdim=True)) / (lg.std(-1, keepdim=True) + 1e-6)
    return torch.softmax(scale * z, -1)


class _ProbeNet(nn.Module):
    def __init__(self, in_shape, n_probes: int, hidden: int, gen: torch.Generator):
        super().__init__()
        c, h, w = in_shape
        self.mask = nn.Parameter(torch.randn((n_probes, 1, h, w), generator=gen) - 2.0)
        self.pattern = nn.Parameter(torch.randn((n_probes, c, h, w), generator=gen))
        self.g = nn.Sequential(nn.Linear(3 * (n_probes + 1), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1))

    def queries(self, base: torch.Tensor) -> torch.Tensor:
        """(P + 1, B, C, H, W): the clean images, then every stamp on every image."""
        a = torch.sigmoid(self.mask)[:, None]
        stamped = (1 - a) * base[None] + a * torch.sigmoid(self.pattern)[:, None]
        return torch.cat([base[None], stamped], 0)

    def forward(self, answers: torch.Tensor, base_y: torch.Tensor, scale: float = 0.0):
        """answers (n, P + 1, B, K) probabilities -> (model scores (n,), class scores (n, K))."""
        if scale:
            answers = standardised(answers, scale)
        n, p1, b, k = answers.shape
        onehot = nn.functional.one_hot(base_y, k).to(answers.dtype)  # (B, K)
        mass = answers.mean(2)  # (n, P+1, K)
        others = (1 - onehot)  # (B, K)
        moved = (answers * others[None, None]).sum(2) / others.sum(0).clamp(min=1)[None, None]
        own = (answers * onehot[None, None]).sum(3).mean(2)  # (n, P+1)
        feats = torch.cat([mass, moved, own[:, :, None].expand(n, p1, k)], 1).transpose(1, 2)  # (n, K, 3(P+1))
        s_t = self.g(feats)[..., 0]
        return torch.logsumexp(s_t, 1), s_t


class StampProbeMeta:
    """Jointly learned stamp probes and a class-shared meta-classifier (see the module's equations).

    Parameters
    ----------
    n_probes : int
        P, the learned stamps.
    n_images : int
        B, held-out images each stamp is applied to (stratified over classes).
    hidden : int
        Width of g's hidden layers.
    epochs, lr, target_weight, batch, seed : training settings (Adam; lambda = target_weight).
    """

    def __init__(self, n_probes: int = 8, n_images: int = 20, hidden: int = 32, epochs: int = 60, lr: float = 1e-2,
                 target_weight: float = 1.0, batch: int = 8, scale: float = 0.0, seed: int = 0, progress: bool = True):
        self.n_probes = n_probes
        self.n_images = n_images
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.target_weight = target_weight
        self.batch = batch
        self.scale = scale
        self.seed = seed
        self.progress = progress

    def _answers(self, models, q: torch.Tensor) -> torch.Tensor:
        p1, b = q.shape[:2]
        flat = q.reshape((p1 * b,) + tuple(q.shape[2:]))
        return torch.stack([torch.softmax(m(flat), dim=1).reshape(p1, b, -1) for m in models])

    def fit(self, models: list, trojaned, targets, base_x: np.ndarray, base_y: np.ndarray) -> "StampProbeMeta":
        """Train on shadow models (torch, logits), labels (n,), target indicators (n, K) and the
        held-out images (base_x, base_y) the stamps are applied to."""
        gen = seeded(self.seed)
        self.base_x_ = np.ascontiguousarray(base_x, np.float32)
        self.base_y_ = np.asarray(base_y, np.int64)
        self.n_classes_ = int(np.shape(targets)[1])
        base, by = torch.from_numpy(self.base_x_), torch.from_numpy(self.base_y_)
        net = _ProbeNet(self.base_x_.shape[1:], self.n_probes, self.hidden, gen)
        self.loss_ = train_jointly(net, lambda batch: net(self._answers(batch, net.queries(base)), by, self.scale),
                                   models, trojaned, targets, self, gen)
        self.net_ = net.eval()
        with torch.no_grad():
            q = net.queries(base)
        self.query_shape_ = tuple(q.shape[:2])
        self.queries_ = q.reshape((-1,) + tuple(q.shape[2:])).numpy().astype(np.float32)
        return self

    def score_answers(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(model scores (n,), class scores (n, K)) for n models' answers (n, (P+1) B, K) to `queries_`."""
        a = torch.as_tensor(np.asarray(probabilities, np.float32))
        a = a.reshape((a.shape[0],) + self.query_shape_ + (a.shape[-1],))
        with torch.no_grad():
            s, s_t = self.net_(a, torch.from_numpy(self.base_y_), self.scale)
        return s.numpy().astype(np.float64), s_t.numpy().astype(np.float64)

    def answers_of(self, models: list) -> np.ndarray:
        """The shadows' answers (n, (P+1) B, K) to the learned queries."""
        with torch.no_grad():
            q = torch.from_numpy(self.queries_)
            return torch.stack([torch.softmax(m(q), dim=1) for m in models]).numpy()

    def state(self) -> dict:
        """Every learned array by name (for saving without pickles)."""
        return {"base_x": self.base_x_, "base_y": self.base_y_.astype(np.float32),
                **{k: v.detach().numpy() for k, v in self.net_.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict, n_classes: int, hidden: int) -> "StampProbeMeta":
        """A fitted meta-classifier rebuilt from `state` (see `state`) for `n_classes` classes and width `hidden`."""
        base_x = np.asarray(state["base_x"], np.float32)
        n_probes = int(np.asarray(state["mask"]).shape[0])
        meta = cls(n_probes=n_probes, n_images=len(base_x), hidden=hidden)
        net = _ProbeNet(base_x.shape[1:], n_probes, hidden, torch.Generator().manual_seed(0))
        net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()
                             if k not in ("base_x", "base_y")})
        meta.net_, meta.base_x_ = net.eval(), base_x
        meta.base_y_ = np.asarray(state["base_y"]).astype(np.int64)
        meta.n_classes_ = n_classes
        with torch.no_grad():
            q = net.queries(torch.from_numpy(base_x))
        meta.query_shape_ = tuple(q.shape[:2])
        meta.queries_ = q.reshape((-1,) + tuple(q.shape[2:])).numpy().astype(np.float32)
        return meta
