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
def test_concurrent_backward_gives_the_gradients_of_one_backward_bit_for_bit(world, assets, tmp_path, recipe):
    from vse_train.backward import ConcurrentBackward
    from vse_train.config import parse_config
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
    assert isinstance(run.concurrent_backward, ConcurrentBackward)  # CPU, one process: on by default
    objective = run.accelerator.unwrap_model(run.opt.objective)
    objective.train()
    batch = next(iter(run.loader))
    batch["pixels"] = run.parts.transform.normalize(batch["pixels"])
    grads = []
    for concurrent in (False, True):
        torch.manual_seed(1)  # the same patch drop and dropout in both forwards
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(batch, 5)
        if concurrent:
            run.concurrent_backward(loss, objective.last_embeddings, list(objective.losses.parameters()))
        else:
            loss.backward()
        grads.append({n: p.grad for n, p in objective.named_parameters() if p.grad is not None})
    run.concurrent_backward.close()
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("losses.") for n in grads[0]) and any(n.startswith("model.image.") for n in grads[0])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
