"""Query gradient estimators agree with true gradients on small differentiable functions."""
import numpy as np
import pytest
import torch

from trojan_gate.gates.deepinspect.estimators import NESEstimator

D, K = 48, 5
W = np.random.default_rng(1).standard_normal((D, K)).astype(np.float64) * 0.5
TARGETS = np.array([0, 3, 1])


def forward(q):
    """A softmax 'model' over a linear map: (N, D) -> (N, K) probabilities."""
    z = np.asarray(q, np.float64).reshape(len(q), -1) @ W
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(out):
    return -np.log(np.take_along_axis(out, TARGETS[:, None, None], axis=2)[..., 0])


def true_grad(v):
    t = torch.tensor(v.reshape(len(v), -1), dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(t @ torch.from_numpy(W), dim=1)
    (-logp[torch.arange(len(v)), torch.from_numpy(TARGETS)]).sum().backward()
    return t.grad.numpy().reshape(v.shape)


def cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_estimate_agrees_with_true_gradient():
    v = np.random.default_rng(2).random((3, 1, 6, 8)).astype(np.float32)
    calls = []

    def counted(q):
        calls.append(len(q))
        return forward(q)

    est = NESEstimator(n_pairs=300, sigma=0.01, seed=0)
    g = est.estimate(counted, nll, v)
    assert calls == [3 * (2 * 300 + 1)]  # every probe of every point in one call
    assert g.queries == calls[0]
    assert g.grad.shape == v.shape
    truth = true_grad(v)
    for i in range(3):
        assert cosine(g.grad[i], truth[i]) > 0.85
    np.testing.assert_allclose(g.loss, nll(forward(v)[:, None])[:, 0], rtol=1e-5)


def test_few_directions_give_a_worse_estimate():
    v = np.random.default_rng(3).random((3, 1, 6, 8)).astype(np.float32)
    truth = true_grad(v)
    few = np.mean([cosine(NESEstimator(n_pairs=2, sigma=0.01, seed=s).estimate(forward, nll, v).grad, truth)
                   for s in range(5)])
    many = cosine(NESEstimator(n_pairs=300, sigma=0.01, seed=0).estimate(forward, nll, v).grad, truth)
    assert many > few


def test_tiled_directions_are_piecewise_constant_and_seeded():
    est = NESEstimator(n_pairs=4, tile=2, seed=5)
    u = est.directions(2, (1, 6, 8))
    assert u.shape == (2, 4, 1, 6, 8)
    np.testing.assert_array_equal(u[..., 0::2, :], u[..., 1::2, :])
    np.testing.assert_array_equal(u[..., 0::2], u[..., 1::2])
    np.testing.assert_array_equal(u, NESEstimator(n_pairs=4, tile=2, seed=5).directions(2, (1, 6, 8)))


def test_estimator_validation():
    with pytest.raises(ValueError):
        NESEstimator(n_pairs=0)
    with pytest.raises(ValueError):
        NESEstimator(n_pairs=2).estimate(forward, lambda out: out[..., 0, 0], np.zeros((3, 1, 6, 8), np.float32))
