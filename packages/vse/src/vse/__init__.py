"""D2S-VSE trainer: image and text encoders, recipes (baseline, stage 1, stage 2), Accelerate training loop.

Public entry points: :func:`vse.models.list_models`, :func:`vse.models.create_model`,
:func:`vse.recipes.list_recipes`, :func:`vse.train.train`, :func:`vse.bundle.load_bundle`.
"""

__version__ = "0.1.0"
