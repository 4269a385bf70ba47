"""Target-L0 control of a sparsity penalty's coefficient (`sae.target_l0`), shared by the penalty-based variants.

A penalty-based SAE (ReLU + L1, JumpReLU, gated) minimises reconstruction + lambda * penalty; its L0 follows from
lambda in a way that moves with the data, the width and the training length. With a target, lambda adapts during
training so that the running L0 settles at the target, a proportional-integral controller on log lambda:

    r_t = beta * r_{t-1} + (1 - beta) * L0_t                 (running L0; r_0 = L0_0)
    e_t = clip(log(r_t / target), -max_below, max_above)     (relative error)
    u_t = u_{t-1} + gain(e_t) * m_t * e_t                    (integral; u_0 = log(initial); m_t: the lr factor)
    lambda_t = exp(u_t + PROPORTIONAL * e_t)

with gain(e) = gains.up for e > 0 (L0 above the target: lambda rises) and gains.down for e < 0, the clip
[-gains.max_below, gains.max_above] per variant (`Gains`). lambda moves by factors, so it can travel orders of
magnitude from its start (the variant's coefficient) and never turns negative; the proportional term reacts at once
to part of the error, which damps the loop. The error is measured in log units (twice the target weighs as much as
half). ReLU's controller (`ASYMMETRIC`) is asymmetric because its plant is: a lambda too high silences latents
within a few dozen steps (for good in a ReLU SAE, whose L0 falls steeply past some lambda), while one too low only
leaves codes denser for a while. So lambda rises slowly (the error above the target is clipped at 0.3, so the dense
first steps cannot wind the integral up) and falls fast; start it below the value the target needs and it approaches
from the dense side. JumpReLU's (`SYMMETRIC`) is faster both ways: it steers only the last 30% of the run, after the
TopK warm-up (docs/variants.md, "The target-L0 controller"). The integral starts after the coefficient's warm-up
ramp. The gain follows the learning-rate schedule: the weights lambda steers move about lr per step, so a controller
faster than them (while lr warms up, or decays to 0 at the end) would only wind up. L0_t is the global batch's mean
L0 (averaged over ranks in data-parallel training), so every rank computes the same lambda. The state (u, r) lives
in non-persistent buffers: checkpointed with the trainer state (exact resume), not saved with the SAE's weights.

A variant holds one `TargetL0Controller` and calls `coefficient(l0, ctx)` once per training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.core.checks import check_number
from saelab.parallel import global_batch
from saelab.sae.base import TrainContext
from saelab.sae.losses import warmup_factor


@dataclass(frozen=True)
class Gains:
    """The controller's per-step integral gains on the log error at the full learning rate (log units of lambda
    per step) while the running L0 is above the target (`up`: lambda rises) and below it (`down`), and the clip
    of the log error to [-max_below, max_above]."""

    up: float
    down: float
    max_above: float
    max_below: float


#: ReLU + L1: lambda rises slowly and falls fast (a ReLU SAE loses latents for good past some lambda).
ASYMMETRIC = Gains(up=0.02, down=0.05, max_above=0.3, max_below=1.0)
#: JumpReLU after its TopK warm-up: the last ~30% of training, most of it while lr decays, with a plant whose L0
#: moves both ways within a few dozen steps of the hand-off: lambda must travel 100x either way in that time.
SYMMETRIC = Gains(up=0.1, down=0.1, max_above=1.0, max_below=1.0)
#: Proportional gain on the log error: lambda reacts at once to part of the error, which damps the integral loop.
PROPORTIONAL = 0.5
#: EMA decay of the running L0.
RUNNING_DECAY = 0.9
#: The saved SAE's L0 may miss the target by this fraction before training warns (issue #25's tolerance).
TARGET_TOLERANCE = 0.1
#: A coefficient below this fraction of its start counts as spent: the penalty no longer shapes the codes.
SPENT = 1e-2
#: End-of-run calibration (`calibration_level`; JumpReLU's thresholds, ReLU's encoder biases): over the last
#: CALIBRATION_BATCHES steps of a run with a target, each a bisection on a log level within
#: [-CALIBRATION_RANGE, CALIBRATION_RANGE] in CALIBRATION_HALVINGS halvings.
CALIBRATION_BATCHES = 16
CALIBRATION_RANGE = 8.0
CALIBRATION_HALVINGS = 32


class TargetL0Controller(nn.Module):
    """lambda for a penalty-based SAE: fixed (`target` None) or adapted so that the running L0 reaches `target`.

    target: the L0 to reach (None: the fixed coefficient `initial`). initial: lambda at the start (> 0 with a
    target). warmup_frac: lambda ramps linearly from 0 over this fraction of the steps (`losses.warmup_factor`);
    the integral adapts only after the ramp. gains: the integral's gains and the error clip.
    """

    def __init__(self, target: float | None, initial: float, warmup_frac: float, gains: Gains = ASYMMETRIC):
        super().__init__()
        self.target = target
        self.initial = initial
        self.warmup_frac = warmup_frac
        self.gains = gains
        start = math.log(initial) if target is not None else 0.0
        self.register_buffer("log_coefficient", torch.tensor(start, dtype=torch.float32), persistent=False)
        self.register_buffer("running_l0", torch.tensor(float("nan"), dtype=torch.float32), persistent=False)

    def coefficient(self, l0: Tensor, ctx: TrainContext) -> Tensor | float:
        """lambda for this step, the warm-up ramp included: a float without a target, else a float32 scalar
        tensor. With a target, also folds this step's L0 (scalar: this rank's mean active latents per row,
        averaged over ranks here) into the running L0 and, after the warm-up, into the integral (device ops only,
        no host sync)."""
        warmup = warmup_factor(ctx.step, ctx.total_steps, self.warmup_frac)
        if self.target is None:
            return warmup * self.initial
        with torch.no_grad():
            l0 = global_batch.mean(l0.detach().to(torch.float32))
            running = torch.where(
                self.running_l0.isnan(), l0, RUNNING_DECAY * self.running_l0 + (1 - RUNNING_DECAY) * l0
            )
            gains = self.gains
            error = (running.clamp_min(1e-3) / self.target).log().clamp(-gains.max_below, gains.max_above)
            self.running_l0.copy_(running)
            if warmup >= 1:
                gain = torch.where(error > 0, gains.up, gains.down)
                self.log_coefficient.add_(gain * ctx.lr_scale * error)
            return warmup * (self.log_coefficient + PROPORTIONAL * error).exp()

    def missed_target(self, l0: float, saturated: str | None) -> str | None:
        """A warning naming `sae.target_l0` when the trained SAE's L0 `l0` is more than TARGET_TOLERANCE off the
        target, else None (also without a target). `saturated`: the variant's evidence that its penalty no longer
        sparsifies the codes (its coefficient spent, thresholds at 0), or None; below the target with such
        evidence, no coefficient >= 0 reaches it: the reconstruction alone makes the codes this sparse (e.g. a
        skip transcoder, whose linear term carries what denser codes would)."""
        if self.target is None or abs(l0 - self.target) <= TARGET_TOLERANCE * self.target:
            return None
        side = "above" if l0 > self.target else "below"
        missed = f"the trained SAE's L0 is {l0:.1f}, {abs(l0 / self.target - 1):.0%} {side} sae.target_l0={self.target:g}"
        if l0 < self.target and saturated is not None:
            return (
                f"{missed} although {saturated}: the reconstruction alone makes the codes this sparse (a skip "
                "transcoder's linear term, for one, carries what denser codes would), so no sparsity coefficient "
                f">= 0 reaches the target. Lower sae.target_l0 (to about {l0:.0f}) or set it to null."
            )
        lam = float(self.log_coefficient.exp())
        return (
            f"{missed}: the controller (lambda now {lam:.3g}) did not get there in the run; train longer, or start "
            f"the sparsity coefficient {'higher' if l0 > self.target else 'lower'}."
        )

    def missed_target_or_spent(self, l0: float) -> str | None:
        """`missed_target` with a spent lambda (`spent`) as the evidence: the warning of ReLU and gated, whose
        penalty saturates only when lambda has fallen away."""
        return self.missed_target(l0, self.spent() if self.target is not None else None)

    def spent(self) -> str | None:
        """The evidence for `missed_target` when lambda ended under SPENT times its start, else None."""
        lam = float(self.log_coefficient.exp())
        if lam >= SPENT * self.initial:
            return None
        return f"the sparsity coefficient fell to {lam:.3g} ({lam / self.initial:.1e} of its start)"

    @torch.no_grad()
    def restart(self, coefficient: Tensor) -> None:
        """Continue from lambda = `coefficient` (a scalar tensor > 0; with a target only): a variant that changes
        its training rule mid-run (JumpReLU after its TopK warm-up) starts the integral at the lambda that holds
        the new rule's L0 instead of where the controller left it; the running L0 restarts."""
        self.log_coefficient.copy_(coefficient.to(torch.float32).log())
        self.running_l0.fill_(float("nan"))


def check_target_l0(target: float | None) -> None:
    """Raise naming `sae.target_l0` unless it is None or a finite number > 0 (its bound, d_sae, is checked when
    training starts: `check_reachable`; a loaded SAE never trains, so its saved target is not held to it)."""
    if target is not None:
        check_number("sae.target_l0", target, low=0, low_open=True, hint="null keeps the coefficient fixed.")


def check_reachable(target: float | None, d_sae: int) -> None:
    """At the start of training: raise naming `sae.target_l0` when it exceeds the number of latents."""
    if target is not None and target > d_sae:
        raise ValueError(
            f"sae.target_l0={target} is more than the SAE's {d_sae} latents (sae.d_sae); lower the target or "
            "widen the SAE."
        )


@torch.no_grad()
def calibration_level(log_score: Tensor, target: float) -> Tensor:
    """The level m in [-CALIBRATION_RANGE, CALIBRATION_RANGE] at which the global batch's rows have `target` entries
    of log_score [B, n] above m on average, by bisection (a scalar float32 tensor; no host sync). An entry of -inf
    never counts (an inactive latent), +inf always does; past the range's ends m stops at the end. The variant
    turns the level into its calibration: a common factor exp(m) on JumpReLU's thresholds, a common soft
    threshold exp(m) on ReLU's weighted codes."""
    low = torch.full((), -CALIBRATION_RANGE, device=log_score.device)
    high = torch.full((), CALIBRATION_RANGE, device=log_score.device)
    for _ in range(CALIBRATION_HALVINGS):
        middle = (low + high) / 2
        dense = global_batch.mean((log_score > middle).sum(dim=1, dtype=torch.float32).mean()) > target
        low, high = torch.where(dense, middle, low), torch.where(dense, high, middle)
    return (low + high) / 2


@torch.no_grad()
def firing_quantile(pre: Tensor, target: float) -> Tensor:
    """Per latent, the value of pre [N, n] that `target / n` of the N rows exceed ([n]): a threshold (or minus a
    bias) at which every latent fires at the same rate and rows have `target` active latents on average."""
    rows, n = pre.shape
    above = min(max(round(rows * target / n), 1), rows)
    return pre.kthvalue(rows - above + 1, dim=0).values
