"""Each D2S-VSE training term as the paper and the authors' code have it (docs/fidelity.md).

Hand-computed cases where the term is arithmetic; behaviour checks (what changes between
train and eval, what a batch contains) where it is a composition of real modules.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vse.models import (
    StudentConfig,
    StudentHead,
    TextConfig,
    TextEncoder,
    TokenAugConfig,
    get_model_config,
    l2norm,
    size_augment_keep,
)
from vse.transforms import ImageTransform, TextTokenizer
from vse_train.config import parse_config
from vse_train.data import ShardStream
from vse_train.objective import Objective, ramp_factor, text_fields
from vse_train.recipes import get_recipe
from vse_train.teacher import freeze_teacher, state_fingerprint
from vse_train.train import train

from .test_train import cfg_doc


def tiny_text_encoder(**text_overrides) -> TextEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        add_pooling_layer=False,
    )
    cfg = TextConfig(backbone=None, **text_overrides)  # type: ignore[arg-type]
    return TextEncoder(cfg, bert, embed_dim=8, gpo=get_model_config("tiny-vit").gpo)


def ids_and_mask(lengths: list[int], width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 50, (n,), generator=g)
        mask[i, :n] = True
    return ids, mask


# ---- item 2: the student head's composition --------------------------------------------------------


def test_head_is_added_raw_in_training_and_l2_normalised_at_evaluation():
    text = tiny_text_encoder(feature_dropout=0.0)
    head = StudentHead(StudentConfig(num_tokens=3, layers=1, heads=2), 8)
    ids, mask = ids_and_mask([5, 3], 6)

    def parts():  # the LayerNorm-ended caption embedding and the mean of the head's token outputs
        words = text.word_features(ids, mask)
        return text.norm(text.gpo(words, mask.sum(1))), head(words, mask)

    with torch.no_grad():
        text.train()
        caption, h = parts()
        train_out = text(ids, mask, head)
        train_raw = text(ids, mask, head, normalize=False)
        text.eval()
        caption_e, h_e = parts()  # (BatchNorm of the text MLP uses running statistics now)
        eval_out = text(ids, mask, head)
    assert torch.allclose(train_raw, caption + h, atol=1e-5)
    assert torch.allclose(train_out, l2norm(caption + h), atol=1e-5)
    assert torch.allclose(eval_out, l2norm(caption_e + h_e / h_e.norm(dim=-1, keepdim=True)), atol=1e-5)
    assert not torch.allclose(eval_out, l2norm(caption_e + h_e), atol=1e-3)
    # the two compositions really differ here: |caption| ~ sqrt(8) and |h| ~ sqrt(8), not 1
    assert (train_out - eval_out).abs().max() > 1e-3
    assert caption.norm(dim=-1).mean() > 2.0


def test_caption_embedding_ends_in_a_layernorm():
    text = tiny_text_encoder(feature_dropout=0.0).eval()
    ids, mask = ids_and_mask([4, 6, 2], 6)
    with torch.no_grad():
        raw = text(ids, mask, normalize=False)
    # LayerNorm with its initial affine (1, 0): zero mean, unit (biased) variance per embedding
    assert torch.allclose(raw.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(raw.var(-1, unbiased=False), torch.ones(3), atol=1e-3)


def test_head_tokens_start_from_a_unit_normal():
    head = StudentHead(StudentConfig(num_tokens=100, layers=1, heads=4), 64)
    assert abs(float(head.tokens.detach().std()) - 1.0) < 0.05  # 6400 draws of N(0, 1)
    small = StudentHead(StudentConfig(num_tokens=100, layers=1, heads=4, token_init_std=0.02), 64)
    assert abs(float(small.tokens.detach().std()) - 0.02) < 0.002


def test_padding_mask_makes_a_caption_independent_of_its_batch():
    text = tiny_text_encoder(feature_dropout=0.0).eval()
    ids, mask = ids_and_mask([4, 9], 9)
    for mask_padding, independent in ((True, True), (False, False)):
        torch.manual_seed(0)
        head = StudentHead(StudentConfig(num_tokens=3, layers=1, heads=2, mask_padding=mask_padding), 8).eval()
        with torch.no_grad():
            alone = text(ids[:1, :4], mask[:1, :4], head)
            batched = text(ids, mask, head)[:1]
        assert torch.allclose(alone, batched, atol=1e-5) == independent


# ---- item 7: dropout on the token features ------------------------------------------------------------


def test_token_features_dropout_only_in_training():
    text = tiny_text_encoder(feature_dropout=0.2)
    ids, mask = ids_and_mask([6, 6], 6)
    with torch.no_grad():
        text.train()
        a, b = text(ids, mask), text(ids, mask)
        text.eval()
        c, d = text(ids, mask), text(ids, mask)
    assert not torch.allclose(a, b) and torch.equal(c, d)
    # a share p of the backbone features is zeroed (the rest scaled by 1 / (1 - p))
    h = torch.ones(200, 50)
    text.train()
    zeroed = float((text.dropout(h) == 0).float().mean())
    assert 0.17 < zeroed < 0.23


# ---- item 1: the distillation term is a batch mean next to the summed triplet; item 4: the ramp ------


def test_ramp_factor_hand_values():
    # the reference multiplies the alignment loss by i / n_batch in the first epoch
    assert [ramp_factor(s, 4) for s in (0, 1, 2, 3, 4, 9)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert ramp_factor(0, 0) == 1.0


class _Fixed(torch.nn.Module):
    """A stand-in model whose embeddings are given tensors (the Objective only composes them)."""

    def __init__(self, image, sparse):
        super().__init__()
        self.image, self.sparse = image, sparse

    def embed_images(self, pixels):
        return l2norm(self.image)

    def embed_texts(self, ids, mask, *, use_student=True, normalize=True):
        return l2norm(self.sparse) if normalize else self.sparse


def test_stage2_objective_is_ramped_summed_triplet_plus_mean_distillation():
    recipe = get_recipe("stage2")
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    sparse = torch.tensor([[1.6, 1.2], [0.0, 3.0], [2.0, 0.0]])  # the test_losses TXT scaled by 2, 3, 2
    teacher = torch.tensor([[0.6, 0.8], [0.0, 5.0], [0.0, 1.0]])  # cos with sparse: 0.96, 1, 0
    batch = {"pixels": None, "sparse_ids": None, "sparse_mask": None, "image_ids": torch.tensor([1, 2, 3])}
    obj = Objective(_Fixed(img, sparse), recipe, steps_per_epoch=4)
    distill = 1 - (0.96 + 1.0 + 0.0) / 3  # batch mean of 1 - cos
    # step 0 of epoch 0: alignment ramped to 0, warm-up sums the hinge over all negatives (2.32)
    total, parts = obj(batch, 0, teacher)
    assert total.item() == pytest.approx(distill, abs=1e-5)
    assert parts["triplet_image_sparse"].item() == pytest.approx(2.32, abs=1e-5)
    # step 2: half the summed warm-up hinge
    assert obj(batch, 2, teacher)[0].item() == pytest.approx(0.5 * 2.32 + distill, abs=1e-5)
    # epoch 1: full weight, hardest negatives (1.92)
    assert obj(batch, 4, teacher)[0].item() == pytest.approx(1.92 + distill, abs=1e-5)


# ---- item 3: an epoch is captions / batch steps (sparse recipes), images / batch (stage 1) ---------------


def test_epoch_counts_captions_for_sparse_recipes_and_images_for_stage1(world, assets, tmp_path):
    # the world fixture: 512 training images, 5 sparse captions each; batch 32
    s1 = train(parse_config(cfg_doc(world, assets, tmp_path / "s1", recipe="stage1", steps=1)))
    run1 = json.loads((tmp_path / "s1" / "run_config.json").read_text())
    assert (run1["epoch_unit"], run1["epoch_size"], run1["steps_per_epoch"]) == ("images", 512, 16)
    train(parse_config(cfg_doc(world, assets, tmp_path / "s2", recipe="stage2", steps=1, init=s1["checkpoint"])))
    run2 = json.loads((tmp_path / "s2" / "run_config.json").read_text())
    assert (run2["epoch_unit"], run2["epoch_size"], run2["steps_per_epoch"]) == ("captions", 2560, 80)
    # epochs: 0.5 of a caption epoch is 40 steps
    doc = cfg_doc(world, assets, tmp_path / "b", recipe="baseline", steps=None, epochs=0.05)
    assert train(parse_config(doc))["steps"] == 4  # round(0.05 * 80)


# ---- item 8: every caption once per epoch ----------------------------------------------------------------


def test_each_caption_once_per_cycle_of_passes():
    stream = ShardStream(["unused.tar"], batch_size=1, collate=None, seed=3)
    from d2s.schema import Sample

    s = Sample(key="k", image=b"x", image_ext="png", id="img-7", dataset="d", split="train", sparse=list("abcde"))
    first = [stream.caption_choice(s, p) for p in range(5)]
    second = [stream.caption_choice(s, p) for p in range(5, 10)]
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [0, 1, 2, 3, 4]
    # another image (or seed) gets another order; "random" leaves the choice to the collate
    orders = {
        tuple(stream.caption_choice(Sample(**{**s.__dict__, "id": f"img-{i}"}), p) for p in range(5)) for i in range(20)
    }
    assert len(orders) > 1
    assert ShardStream(["u"], batch_size=1, collate=None, caption_sampling="random").caption_choice(s, 0) is None


@pytest.mark.slow
def test_stream_feeds_every_caption_exactly_once_per_caption_epoch(world, assets):
    from transformers import AutoTokenizer

    from d2s.shards import read_samples, split_shards
    from vse_train.data import Collate, TextField, image_id_int

    tok = TextTokenizer(AutoTokenizer.from_pretrained(str(assets / "tokenizer")))
    collate = Collate(
        ImageTransform(64, [0.5] * 3, [0.5] * 3),
        tok,
        {"sparse": TextField("sparse", 32, augment=False)},
        TokenAugConfig(),
    )
    samples = read_samples(world, "train")
    by_id = {image_id_int(s.id): s for s in samples}
    stream = ShardStream(split_shards(world, "train"), batch_size=64, collate=collate, seed=0, shuffle_buffer=1)
    seen = []
    it = iter(stream)
    for _ in range(5 * 512 // 64):  # one caption epoch: 5 passes over the 512 images
        b = next(it)
        texts = tok.tok.batch_decode(b["sparse_ids"], skip_special_tokens=True)
        for iid, text in zip(b["image_ids"].tolist(), texts):
            caps = [tok.tok.decode(tok.tok(c)["input_ids"], skip_special_tokens=True) for c in by_id[iid].sparse]
            seen.append((iid, caps.index(text)))
    assert len(seen) == 2560 and len(set(seen)) == 2560


# ---- item 5: the teacher sees what the recipe says ------------------------------------------------------


def test_teacher_in_train_mode_is_stochastic_but_frozen(assets):
    from vse.models import create_model

    recipe = get_recipe("stage2")
    model = create_model("tiny-vit", assets_dir=assets, student_head=True)
    fields = text_fields(recipe, model)
    # the augmented dense text, as long as the model config allows (no truncation below it)
    assert fields["teacher"].augment and fields["teacher"].max_length == model.cfg.text.dense_max_length
    assert recipe.teacher_mode == "train" and not recipe.deterministic_teacher
    import copy

    teacher = freeze_teacher(copy.deepcopy(model.text), recipe.teacher_mode)
    before = state_fingerprint(teacher)
    ids, mask = ids_and_mask([9, 7, 12, 4], 12)
    with torch.no_grad():
        a, b = teacher(ids, mask), teacher(ids, mask)
    assert not torch.allclose(a, b)  # dropout on
    assert state_fingerprint(teacher) == before  # BatchNorm running statistics untouched
    assert not any(p.requires_grad for p in teacher.parameters())
    eval_teacher = freeze_teacher(copy.deepcopy(model.text), "eval")
    with torch.no_grad():
        assert torch.equal(eval_teacher(ids, mask), eval_teacher(ids, mask))


# ---- item 6: image pipeline ---------------------------------------------------------------------------


def test_size_augmentation_drops_about_ten_percent_of_tokens():
    torch.manual_seed(0)
    keep = size_augment_keep(20000, 50, 0.2, "cpu")
    untouched = float(keep.all(1).float().mean())
    # P(u <= 0.2) = 0.2, plus images with u > 0.2 that happen to drop nothing (small for 50 tokens)
    assert 0.19 < untouched < 0.25
    # expected dropped share: E[0.2 u; u > 0.2] = 0.2 * (1 - 0.04) / 2 = 0.096
    assert abs(float(1 - keep.float().mean()) - 0.096) < 0.005
    assert keep.any(1).all()


def test_training_crop_and_flip():
    x = np.zeros((8, 8, 3), dtype=np.uint8)
    x[:, :, 0] = np.arange(8, dtype=np.uint8)[None, :] * 30  # red grows left to right
    im = Image.fromarray(x)
    flip = ImageTransform(8, [0.5] * 3, [0.5] * 3, random_crop=[1.0, 1.0], hflip=1.0)
    out = flip.decode([im], np.random.default_rng(0))[0, 0].numpy()
    assert np.array_equal(out, x[:, ::-1, 0])  # full-size crop, then mirrored
    assert np.array_equal(flip.decode([im])[0, 0].numpy(), x[:, :, 0])  # no rng (evaluation): untouched
    crop = ImageTransform(4, [0.5] * 3, [0.5] * 3, random_crop=[0.5, 0.5], hflip=0.0)
    windows = {
        tuple(np.asarray(im.resize((4, 4), Image.BILINEAR, box=(a, b, a + 4, b + 4)))[0, :, 0])
        for a in range(5)
        for b in range(5)
    }
    for seed in range(10):
        got = crop.decode([im], np.random.default_rng(seed))[0, 0].numpy()
        assert tuple(got[0]) in windows


def test_vit_keeps_its_cls_token(assets):
    from vse.models import create_model

    model = create_model("tiny-vit", assets_dir=assets)
    feats = model.image._features(torch.zeros(1, 3, 64, 64))
    assert feats.shape[1] == 1 + (64 // 16) ** 2


# ---- item 8: caption augmentation per word ----------------------------------------------------------


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able", "cat", "dog"])
    }
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.mark.parametrize("unit, split_words", [("word", 0), ("token", 1)])
def test_augmentation_alters_whole_words(unit, split_words):
    tok = TextTokenizer(wordpiece_tokenizer())
    aug = TokenAugConfig(prob=0.5, mask=1.0, random=0.0, unit=unit)  # altered -> [MASK]
    rng = np.random.default_rng(0)
    mixed = 0
    for _ in range(200):
        ids, _ = tok(["unbelievable cat"], 16, aug, rng)  # [CLS] un ##believ ##able cat [SEP]
        pieces = ids[0, 1:4].tolist()
        assert ids.shape[1] == 6
        mixed += len({p == 4 for p in pieces}) > 1  # some pieces masked, some not
    assert (mixed > 0) == bool(split_words)


# ---- item 9 (option, off by default): clipping the still-scaled fp16 gradients ----------------------


def test_clip_scaled_grads_option_clips_before_unscaling():
    from types import SimpleNamespace

    from vse_train.config import OptimConfig
    from vse_train.objective import clip_gradients

    def clipped_norm(option: bool) -> float:
        p = torch.nn.Parameter(torch.zeros(4))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale((p * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum()).backward()  # true grad norm 5
        opt = torch.optim.SGD([p], lr=1.0)

        def unscale_then_clip(params, max_norm):  # what accelerate does: unscale, then clip
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(params), max_norm)

        acc = SimpleNamespace(scaler=scaler, clip_grad_norm_=unscale_then_clip)
        clip_gradients(acc, [p], OptimConfig(grad_clip=2.0, clip_scaled_grads=option))
        scaler.unscale_(opt) if option else None
        return float(p.grad.norm())

    assert clipped_norm(False) == pytest.approx(2.0, rel=1e-5)  # clipped at 2 after unscaling
    assert clipped_norm(True) == pytest.approx(2.0 / 1024.0, rel=1e-4)  # the reference: 2 / loss scale


def test_run_level_warmup_sets_the_switch_and_the_ramp_of_alignment_terms_only():
    from vse_train.losses import TripletLoss, TripletParams
    from vse_train.recipes import with_warmup

    r = with_warmup(get_recipe("stage2"), 0.1)
    triplet, distill = r.losses
    assert (triplet.ramp_epochs, triplet.params["warmup_epochs"]) == (0.1, 0.1)
    assert distill.ramp_epochs == 0.0 and "warmup_epochs" not in distill.params
    # with 80 steps per epoch, 0.1 epoch = 8 steps: summed warm-up hinge before, hardest after
    loss = TripletLoss(TripletParams(**triplet.params), steps_per_epoch=80)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    assert loss(img, txt, None, step=7).item() == pytest.approx(2.32, abs=1e-6)
    assert loss(img, txt, None, step=8).item() == pytest.approx(1.92, abs=1e-6)
    assert ramp_factor(4, 80 * triplet.ramp_epochs) == 0.5
