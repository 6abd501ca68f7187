"""Fine-tuning on an image folder: data, the training loop, run folders, distributed helpers, evaluation.

``FinetuneConfig`` and ``finetune`` are importable from here; torch is imported when they are first used.
"""
from .. import lazy_attributes

_API = {"FinetuneConfig": "config", "finetune": "loop", "Trainer": "loop", "evaluate_folder": "evaluate"}
__all__ = sorted(_API)
__getattr__ = lazy_attributes(__name__, _API)
