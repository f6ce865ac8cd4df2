"""Whether this training step is one Lightning logs: work only those steps need (host syncs) waits for them."""

from __future__ import annotations


def is_logging_step(module) -> bool:
    """Whether Lightning sends this training step's `self.log` values to the loggers (every
    log_every_n_steps); on other steps on_step-only values are dropped. True outside a Trainer's fit."""
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None or not trainer.training else bool(connector.should_update_logs)
