"""diffusion_glioma: mask-conditioned 3D diffusion for synthetic brain-tumour MRI."""

from .errors import ConfigError, DataError, DiffusionGliomaError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "DenoiserUNet3D", "DiffusionGliomaError", "MaskToMRIPipeline", "__version__"]


def __getattr__(name: str):
    # Lazy, so that the data commands do not pay for importing torch and diffusers.
    if name == "DenoiserUNet3D":
        from .models.unet3d import DenoiserUNet3D

        return DenoiserUNet3D
    if name == "MaskToMRIPipeline":
        from .pipeline import MaskToMRIPipeline

        return MaskToMRIPipeline
    raise AttributeError(f"module 'diffusion_glioma' has no attribute {name!r}")
