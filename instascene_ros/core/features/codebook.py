"""Unified-Lift's object-level codebook: L learnable object embeddings read by argmax.

Per view, every (raw, per-view) mask is mapped to one slot, and the codebook learns to make
that slot win for the mask's rendered features. Instances are then read directly from the
slots (argmax over the live slots), with no post-hoc clustering.

- Area-aware ID mapping: mask m's association with slot k is its probability *mass* on k,
  A_mk = area_m * mean_{p in m} softmax_k(cos(f_p, e_k) / T). Pairs are matched greedily by
  decreasing A_mk, one slot per mask and one mask per slot within a view (two masks of one
  view are two objects). A large, confident mask therefore claims its slot before a small one
  that leans towards the same slot; the small one gets its best remaining slot instead of
  being merged into the large object.
- Noisy-label filtering: a mask's confidence is the fraction of its pixels whose argmax over
  the competing slots is its own slot; competitors are the *live* slots (those that already
  stand for an object) that the view's other masks did not take. An under-segmented mask (two
  objects, two features, two live slots) splits its votes and falls below tau = 0.8; it is
  dropped from the association loss for this step. A mask of an object no slot stands for yet
  competes with nothing and opens a slot (the filter cannot judge what it has never seen).
- Gradient blocking: the association loss sees detached features, so it trains the codebook
  only; the Gaussian features are shaped by the contrastive loss alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import CodebookConfig


@dataclass
class MaskMapping:
    """The slot each mask of one view was mapped to and whether the mask passed the filter."""

    slots: torch.Tensor  # (K,) int64
    confidence: torch.Tensor  # (K,) fraction of the mask's pixels voting for its slot
    kept: torch.Tensor  # (K,) bool, confidence >= tau


class ObjectCodebook:
    """L x d unit-norm object embeddings with their own Adam, and slot usage counts."""

    def __init__(self, dim: int, config: CodebookConfig, generator: torch.Generator):
        self.config = config
        init = F.normalize(torch.randn(config.slots, dim, generator=generator), dim=-1)
        self.embeddings = torch.nn.Parameter(init)
        self.uses = torch.zeros(config.slots, dtype=torch.int64)
        self.optimizer = torch.optim.Adam([self.embeddings], lr=config.lr)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., d) unit features -> (..., L) cosine / temperature."""
        return features @ F.normalize(self.embeddings, dim=-1).T / self.config.temperature

    @torch.no_grad()
    def map_masks(self, pixel_features: torch.Tensor, areas: torch.Tensor) -> MaskMapping:
        """Area-aware ID mapping and noisy-label filtering of the K masks of one view.

        pixel_features: (K, P, d) unit features sampled in each mask; areas: (K,) mask pixels.
        """
        k = pixel_features.shape[0]
        logits = self.logits(pixel_features)  # (K, P, L)
        mass = torch.softmax(logits, dim=-1).mean(dim=1) * areas.to(logits.dtype)[:, None]  # (K, L)
        # Greedy matching on the CPU (a few masks x L slots; a Python loop over a device tensor
        # would synchronise on every element).
        order = torch.argsort(mass.reshape(-1), descending=True).cpu().numpy()
        slots_np = np.full(k, -1, dtype=np.int64)
        taken_np = np.zeros(mass.shape[1], dtype=bool)
        assigned = 0
        for flat in order:
            mask, slot = divmod(int(flat), mass.shape[1])
            if slots_np[mask] >= 0 or taken_np[slot]:
                continue
            slots_np[mask], taken_np[slot] = slot, True
            assigned += 1
            if assigned == k:
                break
        slots = torch.from_numpy(slots_np).to(logits.device)
        taken = torch.from_numpy(taken_np).to(logits.device)
        # Voters: the mask's own slot and the live slots no other mask of the view took. Slots
        # no mask was ever kept for are random directions that stand for no object; letting
        # them vote would make every mask "noisy" until its slot had been trained, which the
        # filter itself forbids.
        live = self.uses >= self.config.min_slot_uses
        confidence = torch.zeros(k, dtype=logits.dtype, device=logits.device)
        for mask in range(k):
            voters = live & ~taken
            voters[slots[mask]] = True
            votes = logits[mask].masked_fill(~voters, float("-inf")).argmax(dim=-1)
            confidence[mask] = (votes == slots[mask]).to(logits.dtype).mean()
        return MaskMapping(slots=slots, confidence=confidence, kept=confidence >= self.config.filter_tau)

    def association_loss(self, pixel_features: torch.Tensor, mapping: MaskMapping) -> torch.Tensor:
        """Cross-entropy pulling each kept mask's pixels to its slot; features are detached."""
        kept = mapping.kept
        if not bool(kept.any()):
            return self.embeddings.sum() * 0.0
        feats = pixel_features[kept].detach()  # gradient blocking: the codebook learns, not the features
        targets = mapping.slots[kept][:, None].expand(feats.shape[:2])
        logits = self.logits(feats)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def record(self, mapping: MaskMapping) -> None:
        kept_slots = mapping.slots[mapping.kept].to(self.uses.device)
        self.uses.index_add_(0, kept_slots, torch.ones_like(kept_slots))

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():  # keep the slots on the unit sphere the features live on
            self.embeddings.data = F.normalize(self.embeddings.data, dim=-1)

    def to(self, device: torch.device) -> "ObjectCodebook":
        state = self.optimizer.state.pop(self.embeddings, None)
        self.embeddings = torch.nn.Parameter(self.embeddings.detach().to(device))
        if state:
            self.optimizer.state[self.embeddings] = {k: v.to(device) if k != "step" else v for k, v in state.items()}
        self.optimizer.param_groups[0]["params"][0] = self.embeddings
        self.uses = self.uses.to(device)
        return self

    @property
    def live_slots(self) -> torch.Tensor:
        return torch.nonzero(self.uses >= self.config.min_slot_uses).squeeze(1)

    @torch.no_grad()
    def read(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Instance per Gaussian straight from the slots: (N,) slot + 1 (0 = none), probability.

        Argmax over the live slots (those masks were mapped to at least `min_slot_uses`
        times); a Gaussian whose winning probability is below `read_min_probability` is none.
        """
        n = features.shape[0]
        live = self.live_slots
        if live.numel() == 0 or n == 0:
            return np.zeros(n, np.int64), np.zeros(n, np.float32)
        logits = F.normalize(features, dim=-1) @ F.normalize(self.embeddings[live], dim=-1).T / self.config.temperature
        probs = torch.softmax(logits, dim=-1)
        best, arg = probs.max(dim=-1)
        labels = (live[arg] + 1).cpu().numpy().astype(np.int64)
        best = best.cpu().numpy()
        labels[best < self.config.read_min_probability] = 0
        return labels, best.astype(np.float32)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.detach().clone(), "uses": self.uses.clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings = torch.nn.Parameter(state["embeddings"].clone())
        self.uses = state["uses"].clone()
        self.optimizer = torch.optim.Adam([self.embeddings], lr=self.config.lr)
        self.optimizer.load_state_dict(state["optimizer"])
