"""Losses as small functions of normalised features (open_clip's style: swappable, testable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unconfuse.eval.models.pretrain import multi_positive_clip_loss

__all__ = ["multi_positive_clip_loss", "hard_negative_loss", "clip_hardneg_loss"]


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


def pair_preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                         ref_rejected: torch.Tensor, policy_chosen_partner: torch.Tensor | None = None,
                         ref_chosen_partner: torch.Tensor | None = None, beta: float = 0.1,
                         image_contrast_weight: float = 0.0, sft_weight: float = 0.0,
                         chosen_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DPO on (correct, other) answers plus the pair image-contrast term, from sequence log-probs.

    - ``dpo``: -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)]), chosen = the correct option
      for the image, rejected = the other option (same prompt, same image).
    - ``image_contrast`` (mDPO's conditional preference, natural on confusing pairs): the same
      prompt and the same correct answer, preferred with its own image over the pair-partner image:
      -log sigmoid(beta * [(pi_w - ref_w) - (pi_w|partner - ref_w|partner)]).
    - ``sft`` (RPO): the chosen answer's negative log-likelihood, per token when ``chosen_tokens`` is given.
    ``image_contrast_weight = 0`` and ``sft_weight = 0`` is plain DPO, the baseline.
    """
    chosen_ratio = policy_chosen - ref_chosen
    parts = {"dpo": -F.logsigmoid(beta * (chosen_ratio - (policy_rejected - ref_rejected))).mean()}
    loss = parts["dpo"]
    if image_contrast_weight:
        if policy_chosen_partner is None or ref_chosen_partner is None:
            raise ValueError("the image-contrast term needs the chosen answer's log-probs with the partner image")
        parts["image_contrast"] = image_contrast_loss(policy_chosen, ref_chosen, policy_chosen_partner,
                                                      ref_chosen_partner, beta)
        loss = loss + image_contrast_weight * parts["image_contrast"]
    if sft_weight:
        nll = -policy_chosen / chosen_tokens if chosen_tokens is not None else -policy_chosen
        parts["sft"] = nll.mean()
        loss = loss + sft_weight * parts["sft"]
    parts["loss"] = loss
    return parts


def image_contrast_loss(policy_own: torch.Tensor, ref_own: torch.Tensor, policy_partner: torch.Tensor,
                        ref_partner: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * [(pi(y|x, own image) - ref(...)) - (pi(y|x, partner image) - ref(...))]):
    the correct answer must become likelier with its own image than with the pair partner's."""
    return -F.logsigmoid(beta * ((policy_own - ref_own) - (policy_partner - ref_partner))).mean()
