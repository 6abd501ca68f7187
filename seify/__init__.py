"""seify: add Squeeze-and-Excitation blocks to trained PyTorch CNNs without losing what they learned.

The API is importable without torch until it is used, so ``seify --help`` stays fast.
"""
__version__ = "0.3.0"


def lazy_attributes(package: str, table: dict[str, str]):
    """A module ``__getattr__`` that imports ``name`` from ``package.table[name]`` on first use."""
    def __getattr__(name):
        if name in table:
            import importlib
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


_API = {
    "load": "models", "resolve": "models", "save": "api", "convert": "api",
    "SEOptions": "options", "find_sites": "sites",
    "SqueezeExcite": "se", "SeifyError": "errors",
}
__all__ = sorted(_API) + ["__version__"]
__getattr__ = lazy_attributes(__name__, _API)
