"""The image encoder's forward and backward in a second thread, next to the text encoders', on
CPU in one process: the two cores the quickstart has, with the same numbers bit for bit.

Forward. The image encoder's only random draw in training is the size augmentation's token
mask (``ImageEncoder.draw_keep``; its backbone must draw none: no dropout, checked here); the
objective draws it first, where the single-thread forward draws it, before any text encoder's
dropout, then hands the image forward to this thread and runs the text encoders meanwhile. So
every random number goes where it went, and every op computes what it computed.

Backward. The loss depends on the parameters only through the embeddings
``Objective.embeddings`` returns and the loss terms' own parameters (an InfoNCE temperature). So
the backward splits into the gradients of the loss with respect to those embeddings and loss
parameters (one autograd call through the loss terms), then one backward per encoder from its
embeddings, at once. The image and text encoders share no parameter, and each branch runs its
autograd nodes in the order the single backward would have (autograd runs the ready node
created last first, and the other branch's nodes never make one of this branch's ready), so
every gradient is the same sum in the same order. No backward draws random numbers.

Used when the run is on CPU in one process, without mixed precision, gradient accumulation or
a loss scaler (``TrainSpec.image_thread``); elsewhere one thread does it all.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


def draws_no_random_numbers(module: nn.Module) -> bool:
    """No dropout or stochastic depth in ``module``: no Dropout layer with p > 0, no drop-path layer
    with a drop probability, no ``*drop*`` config value > 0 (HF attention dropout and Swin's
    ``drop_path_rate`` are config values)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        if "droppath" in type(m).__name__.lower() and getattr(m, "drop_prob", 1.0):
            return False
    config = getattr(module, "config", None)
    values = config.to_dict().items() if hasattr(config, "to_dict") else []
    return not any("drop" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for k, v in values)


class ImageThread:
    """A second thread for the image encoder: ``forward`` (a Future of the image embeddings) and
    ``backward`` (the loss's gradients, the image branch in the thread)."""

    def __init__(self, threads: int, forward: bool):
        # a thread not started by torch has OpenMP's default thread count: set the run's
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix="vse-image", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self.forward_here = forward  # False: the image backbone draws random numbers

    def forward(self, image_encoder: nn.Module, pixels: torch.Tensor) -> Future | None:
        """The image embeddings of ``pixels``, computed in the thread; None when the forward must
        stay in this thread (its mask is not drawn yet, or the backbone draws random numbers)."""
        keep = image_encoder.draw_keep(pixels) if self.forward_here else None
        if keep is None:
            return None
        grad = torch.is_grad_enabled()

        def run() -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                return image_encoder(pixels, keep)

        return self.pool.submit(run)

    def backward(self, loss: torch.Tensor, embeddings: dict[str, torch.Tensor], loss_params: list) -> None:
        image = embeddings.get("image")
        texts = [v for k, v in embeddings.items() if k != "image"]
        if image is None or not texts:
            loss.backward()
            return
        leaves = [p for p in loss_params if p.requires_grad]
        grads = torch.autograd.grad(loss, [image, *texts, *leaves], allow_unused=True)
        for p, g in zip(leaves, grads[1 + len(texts) :]):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        image_done = self.pool.submit(torch.autograd.backward, [image], [grads[0]])
        torch.autograd.backward(texts, list(grads[1 : 1 + len(texts)]))
        image_done.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
