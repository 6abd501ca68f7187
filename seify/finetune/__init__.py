"""Fine-tuning on an image folder: the training loop, run folders, resume, distributed helpers.

``FinetuneConfig`` and ``finetune`` are importable from here; torch is imported when they are first used.
"""
from .. import lazy_attributes

_API = {"FinetuneConfig": "config", "finetune": "loop", "Trainer": "loop"}
__all__ = sorted(_API)
__getattr__ = lazy_attributes(__name__, _API)
