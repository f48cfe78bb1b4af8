"""``deltadist.trainer.DeltaTrainer``, the documented import path of the transformers Trainer
integration; it lives in :mod:`deltadist.integrations.trainer`. Importing this imports
``transformers``."""

from deltadist.integrations.trainer import DeltaTrainer

__all__ = ["DeltaTrainer"]
