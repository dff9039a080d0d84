"""D2S-VSE trainer: recipes (baseline, stage 1, stage 2), losses, the WebDataset loader, the
Accelerate training loop with resumable state, the backbone pre-training, the pipeline stages and the
``vse`` command. Needs the ``train`` extra of d2s-vse (accelerate, tensorboard, webdataset).

Public entry points: :func:`vse_train.recipes.list_recipes`, :func:`vse_train.train.train`,
:func:`vse_train.config.parse_config`. The model side is :mod:`vse`.
"""

__version__ = "0.1.0"
