"""The backward pass of a training step on CPU in one process: the image encoder's branch in a
second thread next to the text encoders', on the two cores the quickstart has.

The loss depends on the parameters only through the embeddings ``Objective.embeddings`` returns
and the loss terms' own parameters (an InfoNCE temperature). So the backward splits, bit for
bit, into: the gradients of the loss with respect to those embeddings and loss parameters (one
autograd call through the loss terms), then one backward per encoder from its embeddings.
The image encoder and the text encoder share no parameter, so the two run at once; each runs
its nodes in the order the single backward would have (autograd takes the ready node created
last first, and the other branch's nodes never make one of this branch's ready), so every
gradient is the same sum in the same order. Nothing in a backward draws random numbers.

Used when the run is on CPU in one process, without gradient accumulation or a loss scaler
(``TrainSpec.concurrent_backward``); elsewhere ``accelerator.backward`` does the one backward.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


class ConcurrentBackward:
    """``(loss, embeddings, loss_params)`` -> gradients in ``.grad``, the image branch in a second thread."""

    def __init__(self, threads: int):
        # a thread not started by torch has OpenMP's default thread count: set the run's
        self.pool = ThreadPoolExecutor(
            1, thread_name_prefix="vse-backward", initializer=torch.set_num_threads, initargs=(threads,)
        )

    def __call__(
        self, loss: torch.Tensor, embeddings: dict[str, torch.Tensor], loss_params: list[torch.Tensor]
    ) -> None:
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
