"""Loss values against small cases computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from vse_train.losses import (
    DistillLoss,
    DistillParams,
    TripletLoss,
    TripletParams,
    distill_loss,
    infonce_loss,
    triplet_loss,
)

# unit vectors; S = img @ txt.T =
#   [[0.8 , 0.0, 1.0],
#    [0.6 , 1.0, 0.0],
#    [0.96, 0.8, 0.6]]      positives (diagonal) 0.8, 1.0, 0.6
IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TXT = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
# hinge 0.2 + S[i,j] - pos, clamped at 0:
#   image anchors (rows):    row1 {j2: 0, j3: 0.4}, row2 {0, 0}, row3 {j1: 0.56, j2: 0.4}
#   caption anchors (cols):  col1 {i2: 0, i3: 0.36}, col2 {0, 0}, col3 {i1: 0.6, i2: 0}


def test_triplet_hardest_negative():
    # rows: 0.4 + 0 + 0.56, columns: 0.36 + 0 + 0.6
    assert triplet_loss(IMG, TXT, margin=0.2, hardest=True).item() == pytest.approx(1.92, abs=1e-6)


def test_triplet_sum_over_negatives_is_the_default_warmup():
    # the reference's ContrastiveLoss without max-violation sums every hinge:
    # rows: 0 + 0.4 + 0 + 0 + 0.56 + 0.4 = 1.36; columns: 0 + 0.36 + 0 + 0 + 0.6 + 0 = 0.96
    assert triplet_loss(IMG, TXT, margin=0.2, hardest=False).item() == pytest.approx(2.32, abs=1e-6)


def test_triplet_mean_over_negatives_option():
    # rows: (0+0.4)/2 + 0 + (0.56+0.4)/2 = 0.68; columns: (0+0.36)/2 + 0 + (0.6+0)/2 = 0.48
    assert triplet_loss(IMG, TXT, margin=0.2, hardest=False, reduction="mean").item() == pytest.approx(1.16, abs=1e-6)


def test_triplet_masks_pairs_sharing_an_image():
    ids = torch.tensor([7, 8, 7])  # items 1 and 3 show the same image: (1,3) and (3,1) are not negatives
    # rows: row1 max{0} = 0, row2 0, row3 max{0.4} = 0.4; columns: col1 max{0} = 0, col2 0, col3 max{0} = 0
    assert triplet_loss(IMG, TXT, ids, margin=0.2, hardest=True).item() == pytest.approx(0.4, abs=1e-6)


def test_triplet_warmup_switches_to_hardest():
    loss = TripletLoss(TripletParams(margin=0.2, max_violation=True, warmup_epochs=1.0), steps_per_epoch=10)
    assert loss(IMG, TXT, None, step=9).item() == pytest.approx(2.32, abs=1e-6)  # sum over negatives
    assert loss(IMG, TXT, None, step=10).item() == pytest.approx(1.92, abs=1e-6)  # hardest
    mean = TripletLoss(TripletParams(warmup_reduction="mean"), steps_per_epoch=10)
    assert mean(IMG, TXT, None, step=0).item() == pytest.approx(1.16, abs=1e-6)
    never = TripletLoss(TripletParams(max_violation=False), steps_per_epoch=10)
    assert never(IMG, TXT, None, step=1000).item() == pytest.approx(2.32, abs=1e-6)


def test_triplet_gradient_reaches_hardest_only():
    img = IMG.clone().requires_grad_()
    triplet_loss(img, TXT, hardest=True).backward()
    # image 2's row has no violation, but it is the hardest image for caption... none (col2 all 0): zero grad
    assert torch.equal(img.grad[1], torch.zeros(2))
    assert img.grad[0].abs().sum() > 0


def test_infonce_hand_case():
    eye = torch.eye(2)
    # logits = I / 1: each row's CE = log(1 + e^-1); both directions equal
    assert infonce_loss(eye, eye, None, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # same image id: the other caption is masked out, only the positive remains -> 0
    assert infonce_loss(eye, eye, torch.tensor([3, 3]), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # temperature 0.5 doubles the logits: log(1 + e^-2)
    assert infonce_loss(eye, eye, None, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_distill_cos_and_mse():
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert distill_loss(s, t, "cos", "sum").item() == pytest.approx(1.0)  # (1 - 0) + (1 - 1)
    assert distill_loss(s, t, "cos", "mean").item() == pytest.approx(0.5)
    # per pair the mean over the 2 dimensions: ((1)^2 + (-1)^2) / 2 = 1 and 0
    assert distill_loss(s, t, "mse", "sum").item() == pytest.approx(1.0)
    assert distill_loss(s, t, "mse", "mean").item() == pytest.approx(0.5)


def test_distill_default_is_the_batch_mean_of_one_minus_cos():
    # the reference: 1 - mean over the batch of cos(student, teacher), unnormalised inputs allowed
    s = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, -5.0], [1.0, 1.0]])
    t = torch.tensor([[4.0, 3.0], [0.0, 7.0], [0.0, 2.0], [2.0, 2.0]])
    # cos: 24/25 = 0.96, 0, -1, 1  -> 1 - (0.96 + 0 - 1 + 1) / 4 = 0.76
    assert DistillLoss(DistillParams(), 1)(s, t, None, 0).item() == pytest.approx(0.76, abs=1e-6)
    # nn.MSELoss of the reference = mean over batch and dimensions, on the raw embeddings
    mse = DistillLoss(DistillParams(metric="mse"), 1)(s, t, None, 0).item()
    assert mse == pytest.approx(torch.nn.functional.mse_loss(s, t).item(), abs=1e-6)
    assert mse == pytest.approx((1 + 1 + 4 + 49 + 0 + 49 + 1 + 1) / 8, abs=1e-6)
    # the teacher never receives gradient
    tt = t.clone().requires_grad_()
    ss = s.clone().requires_grad_()
    DistillLoss(DistillParams(), 1)(ss, tt, None, 0).backward()
    assert tt.grad is None and ss.grad is not None


def test_infonce_sum_reduction_is_batch_times_mean():
    import torch.nn.functional as F

    from vse_train.losses import infonce_loss

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    b = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    mean = infonce_loss(a, b, None, 0.1)
    total = infonce_loss(a, b, None, 0.1, "sum")
    assert torch.allclose(total, 6 * mean)
    # and the mean agrees with a direct computation
    logits = a @ b.t() / 0.1
    direct = (-(logits.diag() - logits.logsumexp(1)).mean() - (logits.diag() - logits.logsumexp(0)).mean()) / 2
    assert torch.allclose(mean, direct, atol=1e-6)
