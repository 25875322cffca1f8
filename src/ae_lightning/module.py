"""The old home of the models, kept so that code importing it keeps working.

The training system is ``ae_lightning.system``; the families are ``ae_lightning.models``.
"""

from ae_lightning.models.ae import Autoencoder
from ae_lightning.models.vae import VariationalAutoencoder

__all__ = ["Autoencoder", "VariationalAutoencoder"]
