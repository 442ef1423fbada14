"""What the notebooks display: tables and plots of each stage's result (no stage logic here)."""

from ftkit.core.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
