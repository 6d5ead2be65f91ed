"""Losses as small functions of normalised features (open_clip's style: swappable, testable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unconfuse.eval.models.clip import multi_positive_clip_loss

__all__ = ["multi_positive_clip_loss", "hard_negative_loss", "clip_hardneg_loss", "image_contrast_loss"]


def hard_negative_loss(logits: torch.Tensor, partner: torch.Tensor, image_side: bool = False) -> torch.Tensor:
    """NegCLIP-style pair term. Text side (default): each image must prefer its own text over its
    pair partner's text. Image side: each text must prefer its own image over the partner image.
    ``logits[i, j]`` scores image i against text j; ``partner[i]`` is the batch index of i's partner."""
    idx = torch.arange(len(partner), device=logits.device)
    own = logits[idx, idx]
    other = logits[partner, idx] if image_side else logits[idx, partner]
    valid = partner != idx  # an item whose partner is not in the batch has no pair term
    if not valid.any():
        return logits.sum() * 0
    pair_logits = torch.stack([own, other], dim=1)[valid]
    return F.cross_entropy(pair_logits, torch.zeros(len(pair_logits), dtype=torch.long, device=logits.device))


def clip_hardneg_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      text_ids: torch.Tensor, partner: torch.Tensor, hardneg_weight: float = 1.0,
                      image_side_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Multi-positive CLIP InfoNCE + weighted pair terms. Both weights 0 is plain CLIP fine-tuning."""
    logits = logit_scale * image_features @ text_features.T
    parts = {"clip": multi_positive_clip_loss(image_features, text_features, logit_scale, text_ids)}
    if hardneg_weight:
        parts["hardneg"] = hard_negative_loss(logits, partner)
    if image_side_weight:
        parts["image_side"] = hard_negative_loss(logits, partner, image_side=True)
    parts["loss"] = parts["clip"] + hardneg_weight * parts.get("hardneg", 0) + image_side_weight * parts.get("image_side", 0)
    return parts


def image_contrast_loss(policy_own: torch.Tensor, ref_own: torch.Tensor, policy_partner: torch.Tensor,
                        ref_partner: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * [(pi(y|x, own image) - ref(...)) - (pi(y|x, partner image) - ref(...))]):
    the correct answer must become likelier with its own image than with the pair partner's."""
    return -F.logsigmoid(beta * ((policy_own - ref_own) - (policy_partner - ref_partner))).mean()
