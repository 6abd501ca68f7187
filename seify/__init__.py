"""seify: add Squeeze-and-Excitation blocks to trained PyTorch CNNs without losing what they learned.

The API is importable without torch until it is used, so ``seify --help`` stays fast.
"""
__version__ = "0.1.0"

_API = {
    "load": "models", "resolve": "models", "save": "api", "convert": "api",
    "SEOptions": "options", "find_sites": "surgery",
    "SqueezeExcite": "se", "SeifyError": "errors",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'seify' has no attribute {name!r}")
