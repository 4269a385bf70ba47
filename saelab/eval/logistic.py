"""Logistic-regression probes in torch, solved to convergence in float64 (no sklearn).

Three objectives, each strictly convex (L2 > 0) or convex (L1), so the solution is the unique optimum, not
the end of a training schedule:

- `fit_logistic` (one binary probe, sklearn's `LogisticRegression(C=...)` objective, intercept unpenalised):
      C * sum_i s_i * bce(x_i . w + b, y_i) + 1/2 ||w||^2
  s_i = 1, or N / (2 N_class(y_i)) with `balanced=True` (sklearn's class_weight="balanced"). Newton's method
  with a backtracking line search for up to NEWTON_MAX_DIM features, L-BFGS (strong Wolfe) above.
- `fit_logistic_ovr` (one-vs-rest probes for C classes at once, SAEBench's first-letter probe objective):
      mean over i, c of bce_pw(X_i . W_c + b_c, Y_ic) + l2 / 2 ||W||^2,
  bce_pw weighting positives by pos_weight_c = negatives_c / positives_c (as torch's BCEWithLogitsLoss);
  SAEBench minimises it (with the bias decayed too) by 50 epochs of Adam.
- `fit_l1_logistic_ovr`: the same with l1 * mean_c ||W_c||_1 added (SAEBench's sparse probe that ranks SAE
  latents), on sparse inputs, solved by FISTA (accelerated proximal gradient with backtracking).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

#: Largest feature count solved with Newton's method (its Hessian is [d + 1, d + 1]).
NEWTON_MAX_DIM = 1024


@dataclass
class LinearProbe:
    """weight [d] (or [C, d]) and bias [] (or [C]), float64; `logits(x [N, d])` -> [N] (or [N, C])."""

    weight: Tensor
    bias: Tensor
    iterations: int = 0

    def logits(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if self.weight.ndim == 1:
            return x @ self.weight + self.bias
        return x @ self.weight.T + self.bias


def class_weights(y: Tensor, balanced: bool) -> Tensor:
    """Per-sample weights [N] float64: ones, or N / (2 * count of the sample's class)."""
    y = y.bool()
    s = torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
    if balanced:
        n_pos = int(y.sum())
        n_neg = y.numel() - n_pos
        if n_pos == 0 or n_neg == 0:
            raise ValueError("a balanced logistic probe needs samples of both classes.")
        s = torch.where(y, y.numel() / (2.0 * n_pos), y.numel() / (2.0 * n_neg)).double()
    return s


def binary_objective(x: Tensor, y: Tensor, s: Tensor, C: float, w: Tensor, b: Tensor) -> Tensor:
    """C * sum_i s_i bce(x_i . w + b, y_i) + ||w||^2 / 2 (float64 scalar)."""
    z = x @ w + b
    return C * (s * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() + 0.5 * w.dot(w)


def fit_logistic(
    x: Tensor,
    y: Tensor,
    C: float = 1.0,
    balanced: bool = False,
    sample_weight: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-8,
) -> LinearProbe:
    """Binary logistic regression (see the module docstring). x [N, d] (cast to float64), y [N] bool/0-1;
    sample_weight [N] replaces the class weights s when given.

    Stops when the gradient's largest entry is below tol * max(1, C * sum s) (or after max_iter iterations)."""
    if C <= 0:
        raise ValueError(f"C={C} must be > 0.")
    x64, y64 = x.double(), y.double()
    s = class_weights(y, balanced) if sample_weight is None else sample_weight.double()
    if y64.min() == y64.max():
        raise ValueError("a logistic probe needs samples of both classes.")
    if x64.shape[1] <= NEWTON_MAX_DIM:
        return _newton(x64, y64, s, C, max_iter, tol)
    return _lbfgs(x64, y64, s, C, max_iter, tol)


def _newton(x: Tensor, y: Tensor, s: Tensor, C: float, max_iter: int, tol: float) -> LinearProbe:
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)  # bias as the last column
    theta = torch.zeros(d + 1, dtype=x.dtype, device=x.device)
    reg = torch.ones(d + 1, dtype=x.dtype, device=x.device)
    reg[-1] = 0.0  # the intercept is not penalised

    def objective(t: Tensor) -> Tensor:
        return binary_objective(x, y, s, C, t[:-1], t[-1])

    scale = max(1.0, C * float(s.sum()))
    value = objective(theta)
    for it in range(1, max_iter + 1):
        p = torch.sigmoid(xa @ theta)
        grad = C * xa.T @ (s * (p - y)) + reg * theta
        if grad.abs().max() <= tol * scale:
            return LinearProbe(theta[:-1], theta[-1], it - 1)
        hess = C * (xa.T * (s * p * (1 - p))) @ xa + torch.diag(reg)
        hess.diagonal().add_(1e-12 * scale)  # keeps an unpenalised, separable intercept solvable
        step = torch.linalg.solve(hess, grad)
        t, decrease = 1.0, float(grad.dot(step))
        while True:  # Armijo backtracking
            candidate = objective(theta - t * step)
            if candidate <= value - 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        theta, value = theta - t * step, candidate
    return LinearProbe(theta[:-1], theta[-1], max_iter)


def _lbfgs(x: Tensor, y: Tensor, s: Tensor, C: float, max_iter: int, tol: float) -> LinearProbe:
    d = x.shape[1]
    w = torch.zeros(d, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    scale = max(1.0, C * float(s.sum()))
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter * 5, tolerance_grad=tol * scale, tolerance_change=0.0,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = binary_objective(x, y, s, C, w, b)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return LinearProbe(w.detach(), b.detach(), int(iterations))


def pos_weights(y: Tensor) -> Tensor:
    """[C] negatives / positives per column of y [N, C] (a column without positives gets weight 1)."""
    pos = y.double().sum(dim=0)
    return torch.where(pos > 0, (y.shape[0] - pos) / pos.clamp_min(1), torch.ones_like(pos))


def ovr_smooth(z: Tensor, y: Tensor, pw: Tensor) -> Tensor:
    """Mean over [N, C] of positive-weighted BCE of logits z against y (float64 scalar)."""
    return F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="mean")


def fit_logistic_ovr(
    x: Tensor, y: Tensor, l2: float = 1e-4, max_iter: int = 200, tol: float = 1e-8
) -> LinearProbe:
    """One-vs-rest probes: x [N, d], y [N, C] 0/1 -> weight [C, d], bias [C] minimising
    mean over i, c of BCE(pos_weight_c) + l2 / 2 ||W||^2 (the bias unpenalised). The objective separates by
    class: each probe is `fit_logistic` with sample weights pos_weight_c on positives and C = 1 / (N C l2)."""
    if l2 <= 0:
        raise ValueError(f"l2={l2} must be > 0.")
    y64 = y.double()
    n, n_classes = y64.shape
    pw = pos_weights(y64)
    probes = []
    for c in range(n_classes):
        if y64[:, c].min() == y64[:, c].max():  # one class only: a constant probe (-inf or +inf)
            constant = float("inf") if y64[0, c] > 0 else float("-inf")
            probes.append(
                LinearProbe(torch.zeros(x.shape[1], dtype=torch.float64), torch.tensor(constant).double())
            )
            continue
        s = torch.where(y64[:, c] > 0, pw[c], torch.ones_like(pw[c]))
        probes.append(
            fit_logistic(
                x, y64[:, c], C=1.0 / (n * n_classes * l2), sample_weight=s, max_iter=max_iter, tol=tol
            )
        )
    return LinearProbe(
        torch.stack([p.weight for p in probes]),
        torch.stack([p.bias for p in probes]),
        max(p.iterations for p in probes),
    )


def fit_l1_logistic_ovr(
    z: Tensor, y: Tensor, l1: float = 0.01, l2: float = 1e-6, max_iter: int = 500, tol: float = 1e-4
) -> LinearProbe:
    """One-vs-rest probes with an L1 penalty, on codes z [N, n] (dense or sparse) and y [N, C]:
    weight [C, n], bias [C] minimising mean BCE(pos_weight) + l2 / 2 ||W||^2 + l1 * mean_c ||W_c||_1
    (bias unpenalised). FISTA with backtracking and gradient-based restarts (O'Donoghue & Candes 2015); stops
    when an iteration moves (W, b) by less than tol relative to their norm (the default suits its use, ranking
    latents by weight; pass a smaller tol for the optimum itself)."""
    if l1 < 0 or l2 < 0:
        raise ValueError(f"l1={l1} and l2={l2} must be >= 0.")
    with warnings.catch_warnings():  # torch calls its CSR layout "beta"; the products used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        zs = (z if z.layout == torch.sparse_csr else z.to_sparse_csr()).to(torch.float64)
        zt = zs.to_sparse_coo().t().coalesce().to_sparse_csr()
    y64 = y.double()
    n_rows, n_classes = y64.shape
    pw = pos_weights(y64)
    shrink = l1 / n_classes  # l1 * mean_c ||W_c||_1 = (l1 / C) * sum |W|

    def smooth(W: Tensor, b: Tensor) -> tuple[float, Tensor]:
        logits = (zs @ W.T) + b  # [N, C]
        return float(ovr_smooth(logits, y64, pw)) + 0.5 * l2 * float(W.pow(2).sum()), logits

    def gradient(W: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        sig = torch.sigmoid(logits)  # d/dlogit of pw*y*softplus(-t) + (1-y)*softplus(t), over N*C terms
        g = ((1 - y64) * sig - pw * y64 * (1 - sig)) / (n_rows * n_classes)
        return (zt @ g).T + l2 * W, g.sum(dim=0)

    W = torch.zeros(n_classes, zs.shape[1], dtype=torch.float64)
    b = torch.zeros(n_classes, dtype=torch.float64)
    W_prev, b_prev, momentum, step = W, b, 1.0, 1.0
    for it in range(1, max_iter + 1):
        mom_next = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        beta = (momentum - 1) / mom_next
        Wy, by = W + beta * (W - W_prev), b + beta * (b - b_prev)
        f_y, logits = smooth(Wy, by)
        gW, gb = gradient(Wy, logits)
        while True:  # backtracking on the smooth part's quadratic upper bound
            W_new = _soft_threshold(Wy - step * gW, step * shrink)
            b_new = by - step * gb
            dW, db = W_new - Wy, b_new - by
            bound = f_y + float((gW * dW).sum() + (gb * db).sum())
            bound += float(dW.pow(2).sum() + db.pow(2).sum()) / (2 * step)
            if smooth(W_new, b_new)[0] <= bound + 1e-15 or step < 1e-12:
                break
            step *= 0.5
        if float((dW * (W_new - W)).sum() + (db * (b_new - b)).sum()) < 0:
            mom_next = 1.0  # the momentum points uphill: restart it
        change = math.sqrt(float((W_new - W).pow(2).sum() + (b_new - b).pow(2).sum()))
        size = math.sqrt(float(W_new.pow(2).sum() + b_new.pow(2).sum()))
        W_prev, b_prev, W, b, momentum = W, b, W_new, b_new, mom_next
        if it > 1 and change <= tol * max(size, 1e-12):
            return LinearProbe(W, b, it)
    return LinearProbe(W, b, max_iter)


def _soft_threshold(w: Tensor, t: float) -> Tensor:
    return torch.sign(w) * (w.abs() - t).clamp_min(0)


def f1_score(pred: Tensor, y: Tensor) -> float:
    """Binary F1 of bool predictions against bool labels (0 when there is no true positive)."""
    pred, y = pred.bool(), y.bool()
    tp = int((pred & y).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / int(pred.sum()), tp / int(y.sum())
    return 2 * precision * recall / (precision + recall)


def accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred.bool() == y.bool()).double().mean())
