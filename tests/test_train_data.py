"""Whole-pair batches and the pair losses, against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from unconfuse.train.data import ClipCollator, PairBatchSampler
from unconfuse.train.losses import clip_hardneg_loss, hard_negative_loss, multi_positive_clip_loss


def test_pair_batches_are_whole_cover_everything_and_replay_per_epoch():
    sampler = PairBatchSampler(n_pairs=11, pairs_per_batch=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    for batch in batches:
        assert all(i ^ 1 in batch for i in batch)  # 2k and 2k+1 together
    assert sorted(i for b in batches for i in b) == list(range(22))
    assert list(sampler) == batches  # same epoch, same batches (resume replays them)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_whole_batches_per_rank_under_ddp():
    """accelerate shards a batch sampler by handing whole batches to ranks: each rank gets whole pairs."""
    from accelerate.data_loader import BatchSamplerShard

    sampler = PairBatchSampler(n_pairs=20, pairs_per_batch=3, seed=0)
    seen = []
    for rank in range(2):
        for batch in BatchSamplerShard(sampler, num_processes=2, process_index=rank, split_batches=False):
            assert all(i ^ 1 in batch for i in batch)
            seen += batch
    assert set(seen) == set(range(40))


def test_collator_marks_partners_and_equal_texts():
    items = [{"pixel_values": torch.zeros(3, 4, 4), "text": t, "item": i}
             for i, t in [(4, "left"), (5, "right"), (0, "left"), (1, "right"), (7, "yes")]]
    batch = ClipCollator(tokenize=lambda texts: torch.zeros(len(texts), 2, dtype=torch.long))(items)
    assert batch["partner"].tolist() == [1, 0, 3, 2, 4]  # item 6 (7's partner) is not in the batch
    assert batch["text_ids"].tolist() == [0, 1, 0, 1, 2]


def test_hard_negative_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5], [1.0, 3.0]])  # image i vs text j
    partner = torch.tensor([1, 0])
    text_side = hard_negative_loss(logits, partner)
    expected = (-math.log(math.exp(2) / (math.exp(2) + math.exp(0.5))) - math.log(math.exp(3) / (math.exp(3) + math.exp(1)))) / 2
    assert text_side.item() == pytest.approx(expected, rel=1e-6)
    image_side = hard_negative_loss(logits, partner, image_side=True)  # text j: image j vs partner image
    expected = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.0))) - math.log(math.exp(3) / (math.exp(3) + math.exp(0.5)))) / 2
    assert image_side.item() == pytest.approx(expected, rel=1e-6)


def test_identical_texts_are_shared_positives():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    txt[2] = txt[0]
    ids = torch.tensor([0, 1, 0, 2])
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    by_hand = 0.5 * (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean())
    assert multi_positive_clip_loss(img, txt, scale, ids).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_zero_weights_reduce_to_plain_clip_fine_tuning():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    ids, partner = torch.arange(6), torch.tensor([1, 0, 3, 2, 5, 4])
    plain = clip_hardneg_loss(img, txt, torch.tensor(5.0), ids, partner, hardneg_weight=0, image_side_weight=0)
    assert plain["loss"].item() == multi_positive_clip_loss(img, txt, torch.tensor(5.0), ids).item()
    full = clip_hardneg_loss(img, txt, torch.tensor(5.0), ids, partner, hardneg_weight=0.5, image_side_weight=0.25)
    assert full["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * full["hardneg"].item()
                                                + 0.25 * full["image_side"].item(), rel=1e-6)


def test_image_contrast_loss_by_hand():
    from unconfuse.train.losses import image_contrast_loss

    own, ref_own = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    partner, ref_partner = torch.tensor([-2.0, -2.5]), torch.tensor([-1.0, -2.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    beta = 0.5
    # -log sigmoid(beta * [(own - ref own) - (partner - ref partner)]), averaged over rows
    expected = [-math.log(sig(beta * ((-1.0 + 1.5) - (-2.0 + 1.0)))), -math.log(sig(beta * ((-2.0 + 2.0) - (-2.5 + 2.0))))]
    assert image_contrast_loss(own, ref_own, partner, ref_partner, beta).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # at the reference (policy == reference) the term is log 2, whatever the images
    assert image_contrast_loss(own, own, partner, partner, beta).item() == pytest.approx(math.log(2), rel=1e-6)


def test_hardneg_label_smoothing_changes_the_pair_term_by_its_known_amount():
    """FSC-CLIP's calibrated hard negatives: with smoothing e, each pair term is (1 - e / 2) * CE(own) + e / 2 * CE(other)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 4) * 3
    partner = torch.tensor([1, 0, 3, 2])
    own = logits[torch.arange(4), torch.arange(4)]
    other = logits[torch.arange(4), partner]
    two_way = torch.stack([own, other], dim=1).log_softmax(dim=1)
    expected = (-(1 - 0.1 / 2) * two_way[:, 0] - 0.1 / 2 * two_way[:, 1]).mean()
    assert hard_negative_loss(logits, partner, label_smoothing=0.1).item() == pytest.approx(expected.item())
    assert hard_negative_loss(logits, partner).item() == pytest.approx(-two_way[:, 0].mean().item())
