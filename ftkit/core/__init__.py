"""The core every stage shares: the typed config, run paths and atomic I/O, models and tokenizers, the
canonical record format and its readers, chat templates and the assistant mask, batching, generation."""

from ftkit.core.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
