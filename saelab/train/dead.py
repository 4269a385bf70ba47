"""The trainer's dead-latent tracker; it lives with the evaluators in `saelab.eval.dead` and is re-exported here."""

from saelab.eval.dead import DeadLatentTracker

__all__ = ["DeadLatentTracker"]
