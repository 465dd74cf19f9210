"""The cohort inferer: encodes each subject with the network, then scores all subjects against each other.

It follows MONAI's ``Inferer`` contract, ``inferer(inputs, network)``: the network (the tokenizer) knows
nothing about the cohort, and the inferer knows nothing about how a volume becomes tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn
from tqdm.auto import tqdm

from .postprocessing import upsample_parts
from .scoring import MATCHING_MODES, fine_scores, freed_memory_kept, median_and_mad, mutual_scores
from .threads import FastestThreadCount
from .transforms import plain_tensor
from .values import as_bool

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
        fine_margin: coarse-to-fine only: fine tokens searched beyond the matched coarse token, along the
            slice axis, on either side.
        fusion: coarse-to-fine only: ``"mean"`` or ``"max"`` of the coarse and fine robust z-score maps.
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
        fine_margin: int = 1,
        fusion: str = "max",
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
        if fusion not in ("mean", "max"):
            raise ValueError(f"fusion must be 'mean' or 'max', got {fusion!r}")
        self.device = device
        self.progress = as_bool(progress, "progress")
        self.fine_margin = fine_margin
        self.fusion = fusion

    @torch.inference_mode()
    def encode_subject(self, volume: torch.Tensor, mask: torch.Tensor, network: nn.Module) -> dict[str, Any]:
        """All that scoring needs of one subject: ``tokens`` and ``valid``, plus ``fine`` and ``fine_valid``
        (one entry per axis, fine tokens kept in float16) when the network makes fine tokens."""
        device = _device_of(network)
        # the mask goes to the network only when it leaves background patches out (a copy per subject otherwise)
        foreground = _inside(mask)[None].to(device) if getattr(network, "skip_background", False) else None
        out = network.tokenize(plain_tensor(volume)[None].to(device), foreground=foreground)
        entry: dict[str, Any] = {
            "tokens": out["tokens"][0].cpu(),
            "valid": self.token_validity(mask, network.slice_depth),
        }
        if "fine" in out:
            entry["fine"] = [f[0].to(torch.float16).cpu() for f in out["fine"]]
            entry["fine_valid"] = [self.token_validity(mask, _fine_kernel(network, axis)) for axis in network.axes]
        return entry

    def token_validity(self, mask: torch.Tensor, token_size: int | tuple[int, int, int]) -> torch.Tensor:
        """Which tokens of a ``(1, D, H, W)`` mask are covered enough to be scored and matched."""
        coverage = F.avg_pool3d(_inside(mask).float()[None], token_size)[0, 0]
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
        total, count = 0.0, 0
        for _, s in self._group_scores(tokens, valid, num_groups, subjects, "scoring (axis x block)"):
            total, count = _accumulate(total, count, s)
        return torch.where(count > 0, total / count.clamp(min=1), torch.nan).cpu()

    def _group_scores(self, tokens, valid, num_groups, subjects, desc, selection=False):
        """Mutual scores of each (axis, block) group of token channels, one group at a time."""
        device = torch.device(self.device or tokens.device)
        n, gc, *grid = tokens.shape
        groups = tokens.view(n, num_groups, gc // num_groups, *grid)
        valid = valid.to(device)
        # on a CPU, groups (equal in cost) run under the faster of all physical cores and one thread (see threads)
        run = FastestThreadCount() if device.type == "cpu" else (lambda unit: unit())
        with freed_memory_kept(self.matching):  # across the groups too: each one's temporaries are like the last's
            for g in tqdm(range(num_groups), desc=desc, disable=not self.progress, leave=False):
                yield g, run(
                    lambda: mutual_scores(
                        groups[:, g].to(device).float(),
                        valid,
                        self.alpha,
                        self.matching,
                        self.window,
                        self.budget_bytes,
                        subjects,
                        return_selection=selection,
                    )
                )

    @torch.inference_mode()
    def score_entries(
        self, entries: Sequence[Mapping[str, Any]], network: nn.Module, subjects: list[int] | None = None
    ) -> torch.Tensor:
        """Scores of the subjects described by ``entries`` (what :meth:`encode_subject` returns).

        Coarse tokens only: token scores ``(S, d, h, w)`` (distances). With fine tokens: coarse-to-fine
        scores ``(S, d * r, h * r, w * r)`` with r = slice_depth / fine_depth: the fine pass compares each
        fine token only with the subjects and positions the coarse pass selected, then both maps are made
        robust z-scores over the subject's own tokens (median, 1.4826 MAD) and fused (``fusion``).
        """
        tokens = torch.stack([e["tokens"] for e in entries])
        valid = torch.stack([e["valid"] for e in entries])
        if "fine" not in entries[0]:
            return self.score(tokens, valid, network.num_groups, subjects)
        return self._score_coarse_to_fine(tokens, valid, entries, network, subjects)

    def _score_coarse_to_fine(self, tokens, valid, entries, network, subjects) -> torch.Tensor:
        device = self.device or tokens.device
        rows = list(range(tokens.shape[0])) if subjects is None else list(subjects)
        r = network.slice_depth // network.fine_depth
        frame = [size * r for size in tokens.shape[2:]]
        per_axis = network.encoder.num_outputs
        fine = [torch.stack([e["fine"][a] for e in entries]) for a in range(len(network.axes))]
        fine_valid = [torch.stack([e["fine_valid"][a] for e in entries]).to(device) for a in range(len(network.axes))]
        coarse_sum, coarse_count = 0.0, 0
        fine_num = torch.zeros(len(rows), *frame, device=device)
        fine_den = torch.zeros(len(rows), *frame, device=device)
        for g, (s, chosen, matched) in self._group_scores(
            tokens, valid, network.num_groups, rows, "scoring coarse-to-fine", selection=True
        ):
            coarse_sum, coarse_count = _accumulate(coarse_sum, coarse_count, s)
            a, b = divmod(g, per_axis)
            block = fine[a][:, b * network.channels : (b + 1) * network.channels].to(device)
            for row, i in enumerate(rows):
                f = fine_scores(
                    block[i],
                    fine_valid[a][i],
                    block,
                    fine_valid[a],
                    chosen[row],
                    matched[row],
                    network.axes[a],
                    self.fine_margin,
                    self.budget_bytes,
                )
                num, den = upsample_parts(f, frame)
                fine_num[row] += num
                fine_den[row] += den
        coarse = torch.where(coarse_count > 0, coarse_sum / coarse_count.clamp(min=1), torch.nan)
        fused = []
        for row in range(len(rows)):
            num, den = upsample_parts(_robust_z(coarse[row]), frame)
            coarse_up = torch.where(den > 1e-6, num / den.clamp(min=1e-6), torch.nan)
            fine_map = _robust_z(
                torch.where(fine_den[row] > 1e-6, fine_num[row] / fine_den[row].clamp(min=1e-6), torch.nan)
            )
            stacked = torch.stack([coarse_up, fine_map])
            reduced = (
                stacked.nanmean(0)
                if self.fusion == "mean"
                else torch.where(torch.isnan(stacked), -torch.inf, stacked).amax(0)
            )
            fused.append(torch.where(torch.isfinite(reduced), reduced, torch.nan))
        return torch.stack(fused).cpu()

    def __call__(  # type: ignore[override]
        self, inputs: Sequence[torch.Tensor], network: nn.Module, masks: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Score a cohort held in memory: ``inputs`` and ``masks`` are ``(1, D, H, W)`` volumes on one grid.

        Returns token scores ``(N, 1, d, h, w)`` (coarse tokens) or coarse-to-fine scores (fine tokens).
        """
        return self.score_entries([self.encode_subject(v, m, network) for v, m in zip(inputs, masks)], network)[:, None]


def _accumulate(total, count, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sum and count of the finite ``scores`` (for a mean that ignores NaN)."""
    finite = torch.isfinite(scores)
    return total + torch.where(finite, scores, 0.0), count + finite


def _fine_kernel(network: nn.Module, axis: int) -> tuple[int, int, int]:
    """Voxels a fine token of ``axis`` covers: fine_depth slices by one patch."""
    kernel = [network.slice_depth] * 3
    kernel[axis] = network.fine_depth
    return tuple(kernel)


def _robust_z(scores: torch.Tensor) -> torch.Tensor:
    """(scores - median) / (1.4826 MAD) over the finite values: puts coarse and fine maps on one scale."""
    finite = scores[torch.isfinite(scores)]
    if finite.numel() == 0:
        return scores
    median, mad = median_and_mad(finite)
    return (scores - median) / max(1.4826 * mad, 1e-12)


def _inside(mask: torch.Tensor) -> torch.Tensor:
    """Which voxels of a mask count as inside it: the one threshold of token validity and of the encoder's foreground."""
    return plain_tensor(mask) > 0.5


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
