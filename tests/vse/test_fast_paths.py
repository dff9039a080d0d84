"""The CPU fast paths of GPO against what they replace: ``sort_descending`` against ``torch.sort``
(bit for bit), and ``GPOConfig.fast`` (split GRU, numpy tie order) against the packed GRU."""

from __future__ import annotations

import pytest
import torch

from vse.models import GPO, get_model_config, sort_descending


def features(seed: int = 0, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 40, 8, generator=g)
    if ties:  # values on a coarse grid: many exactly equal elements per column
        x = (x * 2).round() / 2
    lengths = torch.randint(1, 41, (16,), generator=g)
    lengths[0] = 40
    return x, lengths


@pytest.mark.parametrize("ties", [False, True])
def test_sort_without_gradient_equals_torch_sort_bit_for_bit(ties):
    x, _ = features(ties=ties)
    with torch.no_grad():
        want = x.sort(dim=1, descending=True).values
        assert torch.equal(sort_descending(x, 1), want)
        assert torch.equal(sort_descending(x.transpose(1, 2), 2), x.transpose(1, 2).sort(dim=2, descending=True).values)


def test_sort_with_gradient_is_torch_sort_unless_any_tie_order():
    x, _ = features(ties=True)
    w = torch.randn(x.shape)
    grads = {}
    for name, fn in {
        "torch": lambda t: t.sort(dim=1, descending=True).values,
        "exact": lambda t: sort_descending(t, 1),
        "any_tie_order": lambda t: sort_descending(t, 1, any_tie_order=True),
    }.items():
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        assert torch.equal(out.detach(), x.sort(dim=1, descending=True).values), name
        (out * w).sum().backward()
        grads[name] = leaf.grad
    assert torch.equal(grads["exact"], grads["torch"])
    # numpy breaks ties its own way: another rank's weight for tied elements, the same total per column
    assert not torch.equal(grads["any_tie_order"], grads["torch"])
    assert torch.allclose(grads["any_tie_order"].sum(1), grads["torch"].sum(1), atol=1e-5)


def test_sort_with_gradient_and_no_ties_is_bit_identical_in_any_tie_order():
    x, _ = features(ties=False)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(x.shape)
    (a.sort(dim=1, descending=True).values * w).sum().backward()
    (sort_descending(b, 1, any_tie_order=True) * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_fast_gpo_agrees_with_the_packed_gru_to_float_rounding():
    cfg = get_model_config("tiny-vit").gpo
    torch.manual_seed(0)
    exact = GPO(cfg.d_pe, cfg.d_hidden, cfg.temperature, fast=False)
    fast = GPO(cfg.d_pe, cfg.d_hidden, cfg.temperature, fast=True)
    fast.load_state_dict(exact.state_dict())
    x, lengths = features()
    outs, grads = [], []
    for gpo in (exact, fast):
        leaf = x.clone().requires_grad_()
        out = gpo(leaf, lengths)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([leaf.grad] + [p.grad for p in gpo.parameters()])
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the weights: zero beyond each length, summing to 1, as the packed GRU's
    w_exact, w_fast = exact.pool_weights(lengths), fast.pool_weights(lengths)
    assert torch.equal(w_fast == 0, w_exact == 0)
    assert torch.allclose(w_fast.sum(1), torch.ones(16))
    assert torch.allclose(w_fast, w_exact, rtol=1e-5, atol=1e-7)


def test_fast_is_a_model_config_option_and_off_by_default():
    assert get_model_config("tiny-vit").gpo.fast is False
    assert get_model_config("tiny-vit", **{"gpo.fast": True}).gpo.fast is True


@pytest.mark.parametrize("recipe", ["stage1", "baseline"])
def test_image_thread_gives_the_numbers_of_one_thread_bit_for_bit(world, assets, tmp_path, recipe):
    from vse_train.config import parse_config
    from vse_train.image_thread import ImageThread
    from vse_train.train import build_run

    doc = {
        "shards": str(world),
        "out": str(tmp_path / "run"),
        "assets": str(assets),
        "recipe": recipe,
        "steps": 2,
        "threads": 1,
        "tracker": "none",
        "align_loss": {"kind": "infonce"},  # a loss parameter (the temperature) besides the encoders
        "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 16},
    }
    run, _ = build_run(parse_config(doc))
    objective = run.accelerator.unwrap_model(run.opt.objective)
    thread = objective.image_thread
    assert isinstance(thread, ImageThread) and thread.forward_here  # CPU, one process, tiny-vit: no dropout
    objective.train()
    batch = next(iter(run.loader))
    batch["pixels"] = run.parts.transform.normalize(batch["pixels"])
    results = []
    assert objective.model.image.draw_keep(batch["pixels"]) is None  # the token count: known after a forward
    for threaded in (False, True, True):
        objective.image_thread = thread if threaded else None
        if threaded:  # the image forward does go to the thread
            probe = thread.forward(objective.model.image, batch["pixels"])
            assert probe is not None
            probe.result()
        torch.manual_seed(1)  # the same patch drop and dropout in every forward
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(batch, 5)
        if threaded:
            thread.backward(loss, objective.last_embeddings, list(objective.losses.parameters()))
        else:
            loss.backward()
        grads = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in objective.last_embeddings.items()}, grads))
    thread.close()
    (loss0, emb0, grads0) = results[0]
    assert any(n.startswith("losses.") for n in grads0) and any(n.startswith("model.image.") for n in grads0)
    for loss, emb, grads in results[1:]:
        assert torch.equal(loss, loss0)
        assert emb.keys() == emb0.keys() and all(torch.equal(emb[k], emb0[k]) for k in emb0)
        assert grads.keys() == grads0.keys() and all(torch.equal(grads[n], grads0[n]) for n in grads0)


def test_a_backbone_with_dropout_keeps_the_image_forward_in_the_main_thread():
    from transformers import ViTConfig, ViTModel

    from vse_train.image_thread import draws_no_random_numbers

    quiet = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=8)
    assert draws_no_random_numbers(
        ViTModel(ViTConfig(**quiet, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    )
    assert not draws_no_random_numbers(
        ViTModel(ViTConfig(**quiet, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1))
    )
    assert not draws_no_random_numbers(
        ViTModel(ViTConfig(**quiet, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0))
    )
    from transformers import SwinConfig, SwinModel

    swin = dict(image_size=8, patch_size=2, embed_dim=4, depths=[1], num_heads=[1], window_size=2)
    assert draws_no_random_numbers(SwinModel(SwinConfig(**swin, hidden_dropout_prob=0.0, drop_path_rate=0.0)))
    assert not draws_no_random_numbers(SwinModel(SwinConfig(**swin, hidden_dropout_prob=0.0, drop_path_rate=0.1)))
