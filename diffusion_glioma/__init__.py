"""diffusion_glioma: mask-conditioned 3D diffusion for synthetic brain-tumour MRI."""

from .errors import DataError, DiffusionGliomaError

__version__ = "0.1.0"
__all__ = ["DataError", "DiffusionGliomaError", "__version__"]
