"""Losses as small functions of normalised features (open_clip's style: swappable, testable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unconfuse.eval.models.clip import multi_positive_clip_loss

__all__ = ["multi_positive_clip_loss", "hard_negative_loss", "clip_hardneg_loss", "distill_loss", "image_contrast_loss"]


def hard_negative_loss(logits: torch.Tensor, partner: torch.Tensor, image_side: bool = False,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """NegCLIP-style pair term. Text side (default): each image must prefer its own text over its
    pair partner's text. Image side: each text must prefer its own image over the partner image.
    ``logits[i, j]`` scores image i against text j; ``partner[i]`` is the batch index of i's partner.
    ``label_smoothing`` (FSC-CLIP's calibration of the hard-negative term) softens the two-way target."""
    idx = torch.arange(len(partner), device=logits.device)
    own = logits[idx, idx]
    other = logits[partner, idx] if image_side else logits[idx, partner]
    valid = partner != idx  # an item whose partner is not in the batch has no pair term
    if not valid.any():
        return logits.sum() * 0
    pair_logits = torch.stack([own, other], dim=1)[valid]
    return F.cross_entropy(pair_logits, torch.zeros(len(pair_logits), dtype=torch.long, device=logits.device),
                           label_smoothing=label_smoothing)


def clip_hardneg_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      text_ids: torch.Tensor, partner: torch.Tensor, hardneg_weight: float = 1.0,
                      image_side_weight: float = 0.0, replay: torch.Tensor | None = None,
                      hardneg_label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Multi-positive CLIP InfoNCE + weighted pair terms. Both weights 0 is plain CLIP fine-tuning.

    With ``replay`` (True for the batch's replay items), the pair items and the replay items are two contrastive
    problems: the pair part (InfoNCE + pair terms) on the pair items, a plain multi-positive InfoNCE on the
    replay items (``replay``), and the loss is the two weighted by their shares of the batch."""
    if replay is not None and replay.any():
        keep = (~replay).nonzero().squeeze(1)
        position = torch.full_like(partner, -1)
        position[keep] = torch.arange(len(keep), device=partner.device)
        parts = clip_hardneg_loss(image_features[keep], text_features[keep], logit_scale, text_ids[keep],
                                  position[partner[keep]], hardneg_weight, image_side_weight,
                                  hardneg_label_smoothing=hardneg_label_smoothing)
        parts["replay"] = multi_positive_clip_loss(image_features[replay], text_features[replay], logit_scale,
                                                   text_ids[replay])
        share = replay.float().mean()
        parts["loss"] = (1 - share) * parts["loss"] + share * parts["replay"]
        return parts
    logits = logit_scale * image_features @ text_features.T
    parts = {"clip": multi_positive_clip_loss(image_features, text_features, logit_scale, text_ids)}
    if hardneg_weight:
        parts["hardneg"] = hard_negative_loss(logits, partner, label_smoothing=hardneg_label_smoothing)
    if image_side_weight:
        parts["image_side"] = hard_negative_loss(logits, partner, image_side=True, label_smoothing=hardneg_label_smoothing)
    parts["loss"] = parts["clip"] + hardneg_weight * parts.get("hardneg", 0) + image_side_weight * parts.get("image_side", 0)
    return parts


def distill_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 teacher_image_features: torch.Tensor, teacher_text_features: torch.Tensor,
                 teacher_logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ``DistillClipLoss`` term: the cross-entropy of the student's image-to-text and text-to-image
    distributions over the batch against the teacher's (the frozen base), averaged over the two directions."""
    from open_clip.loss import DistillClipLoss

    loss = DistillClipLoss()
    student = loss.get_logits(image_features, text_features, logit_scale)
    teacher = loss.get_logits(teacher_image_features, teacher_text_features, teacher_logit_scale)
    return (loss.dist_loss(teacher[0], student[0]) + loss.dist_loss(teacher[1], student[1])) / 2


def image_contrast_loss(policy_own: torch.Tensor, ref_own: torch.Tensor, policy_partner: torch.Tensor,
                        ref_partner: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * [(pi(y|x, own image) - ref(...)) - (pi(y|x, partner image) - ref(...))]):
    the correct answer must become likelier with its own image than with the pair partner's."""
    return -F.logsigmoid(beta * ((policy_own - ref_own) - (policy_partner - ref_partner))).mean()
