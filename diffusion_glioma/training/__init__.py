"""Training loops: the diffusion model (`diffusion.py`), the GAN baselines (`cgan.py`) and the VAE
baseline (`vae.py`), sharing the run machinery in `common.py`."""


def train_for_config(config, *, resume: bool = False):
    """Train (or resume) whichever model kind the config describes; returns the pipeline folder."""
    if config.gan is not None:
        from .cgan import train_cgan as train
    elif config.vae is not None:
        from .vae import train_vae as train
    else:
        from .diffusion import train
    return train(config, resume=resume)
