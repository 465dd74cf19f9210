"""The cohort inferer: encodes each subject with the network, then scores all subjects against each other.

It follows MONAI's ``Inferer`` contract, ``inferer(inputs, network)``: the network (the tokenizer) knows
nothing about the cohort, and the inferer knows nothing about how a volume becomes tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn
from tqdm.auto import tqdm

from .scoring import MATCHING_MODES, mutual_scores

__all__ = ["CohortInferer"]


class CohortInferer(Inferer):
    """Zero-shot cross-subject scoring of a cohort of volumes on a common grid.

    Args:
        matching: ``"window"`` (compare only nearby grid positions; cohorts on a common grid) or
            ``"global"`` (compare with every token of the other subjects, MuSc-style).
        window: half-width of the matching window in token positions (``window`` mode).
        alpha: fraction of the other subjects a token score averages over (the closest ones).
        min_token_coverage: fraction of a token's voxels that must lie inside the mask for the token to
            be scored and used as a reference.
        memory_budget_mb: bound on the temporary memory of the distance computations.
        device: where scoring runs (default: where the tokens are).
        progress: show progress bars.
    """

    def __init__(
        self,
        matching: str = "window",
        window: int = 1,
        alpha: float = 0.3,
        min_token_coverage: float = 0.5,
        memory_budget_mb: float = 256,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if matching not in MATCHING_MODES:
            raise ValueError(f"matching must be one of {MATCHING_MODES}, got {matching!r}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.matching = matching
        self.window = window
        self.alpha = alpha
        self.min_token_coverage = min_token_coverage
        self.budget_bytes = int(memory_budget_mb * 2**20)
        self.device = device
        self.progress = progress

    @torch.inference_mode()
    def encode(self, volume: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """Tokens ``(G * C, d, h, w)`` of one channel-first volume ``(1, D, H, W)``, returned on the CPU."""
        x = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
        return network(x[None].to(_device_of(network)))[0].cpu()

    def token_validity(self, mask: torch.Tensor, token_size: int) -> torch.Tensor:
        """Which tokens of a ``(1, D, H, W)`` mask are covered enough to be scored and matched."""
        plain = mask.as_tensor() if isinstance(mask, MetaTensor) else mask
        coverage = F.avg_pool3d((plain > 0.5).float()[None], token_size)[0, 0]
        return coverage >= self.min_token_coverage

    @torch.inference_mode()
    def score(
        self, tokens: torch.Tensor, valid: torch.Tensor, num_groups: int, subjects: list[int] | None = None
    ) -> torch.Tensor:
        """Token scores ``(S, d, h, w)``: mutual scores averaged over the groups (axes x blocks), NaN if unscored.

        Args:
            tokens: ``(N, G * C, d, h, w)`` stacked tokens of the cohort.
            valid: ``(N, d, h, w)`` bool token validity.
            num_groups: G, the number of (axis, block) groups in the channel dimension.
            subjects: indices of the S subjects to score (default all N); every subject is a reference.
        """
        device = self.device or tokens.device
        n, gc, *grid = tokens.shape
        groups = tokens.view(n, num_groups, gc // num_groups, *grid)
        valid = valid.to(device)
        rows = n if subjects is None else len(subjects)
        total = torch.zeros(rows, *grid, device=device)
        count = torch.zeros(rows, *grid, device=device)
        for g in tqdm(range(num_groups), desc="scoring (axis x block)", disable=not self.progress, leave=False):
            s = mutual_scores(
                groups[:, g].to(device).float(), valid, self.alpha, self.matching, self.window, self.budget_bytes,
                subjects,
            )
            finite = torch.isfinite(s)
            total += torch.where(finite, s, 0.0)
            count += finite
        return torch.where(count > 0, total / count.clamp(min=1), torch.nan).cpu()

    def __call__(  # type: ignore[override]
        self, inputs: Sequence[torch.Tensor], network: nn.Module, masks: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Score a cohort held in memory: ``inputs`` and ``masks`` are ``(1, D, H, W)`` volumes on one grid.

        Returns token scores ``(N, 1, d, h, w)``.
        """
        tokens = torch.stack([self.encode(v, network) for v in inputs])
        valid = torch.stack([self.token_validity(m, network.slice_depth) for m in masks])
        return self.score(tokens, valid, network.num_groups)[:, None]


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
