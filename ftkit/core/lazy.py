"""Submodules imported on first use, so ``import ftkit`` stays light."""


def lazy_submodules(package: str):
    """A module ``__getattr__`` importing ``package``'s submodules on first use, so ``import ftkit`` stays light
    and a notebook can write ``ftkit.report.common.counts_table(...)`` after ``import ftkit``."""
    import importlib
    import importlib.util

    def __getattr__(name: str):
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
