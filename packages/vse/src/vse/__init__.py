"""D2S-VSE model library: model configs and encoders, transforms, checkpoints, inference bundles.

Public entry points: :func:`vse.models.list_models`, :func:`vse.models.create_model`,
:func:`vse.bundle.load_bundle`, :func:`vse.checkpoint.load_checkpoint`. Training (recipes,
losses, the Accelerate loop, the pipeline stages, the ``vse`` command) is :mod:`vse_train`,
installed with the ``train`` extra (``pip install d2s-vse[train]``); nothing here imports it.
"""

__version__ = "0.1.0"
