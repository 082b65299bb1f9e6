"""Guest image loaders (pykvm.boot.loader) and the binary formats they read (pykvm.boot.formats)."""
from pykvm.boot.loader import LoadedImage, load_image

__all__ = ["LoadedImage", "load_image"]
