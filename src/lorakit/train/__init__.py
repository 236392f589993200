"""Fine-tuning tools behind ``lorakit train`` / ``eval`` / ``generate`` / ``merge`` / ``demo``.

Heavy dependencies (transformers, matplotlib, sacrebleu) are imported lazily inside functions, so
importing this package is cheap.
"""

from __future__ import annotations

from lorakit.train.errors import DataError, ModelLoadError, ResumeError, TrainConfigError, UnknownTaskError

__all__ = ["DataError", "ModelLoadError", "ResumeError", "TrainConfigError", "UnknownTaskError"]
