"""Prompt-as-prefix: a dataset description, the task, and statistics of each input series.

Statistics (of the normalized input): min, max, median, the trend (sign of the summed first
differences) and the top-5 autocorrelation lags, found with the FFT (lag 0, trivially the
largest, and the mirrored second half are left out). Numbers are printed with 3 decimals, so prompts are short and stable.
"""

from __future__ import annotations

import torch

DESCRIPTIONS = {
    "ETT": ("The ETT data record an electricity transformer: the oil temperature, the target, beside "
            "six power load features, measured over two years in two counties of China."),
    "custom": "A numeric time series with a date column.",
}


def description_for(kind: str, override: str | None) -> str:
    if override:
        return override
    return DESCRIPTIONS["ETT"] if kind.startswith("ETT") else DESCRIPTIONS["custom"]


def top_lags(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """x [B', T] -> the k lags (1..T//2) of highest autocorrelation, [B', k].

    The circular autocorrelation is symmetric (lag j equals lag T-j), so only the first half is
    ranked: otherwise every lag ties with its mirror and the order depends on rounding.
    """
    spec = torch.fft.rfft(x, dim=-1)
    corr = torch.fft.irfft(spec * torch.conj(spec), n=x.shape[-1], dim=-1)[:, 1: x.shape[-1] // 2 + 1]
    return torch.topk(corr, min(k, corr.shape[-1]), dim=-1).indices + 1


def build_prompts(x: torch.Tensor, description: str, seq_len: int, pred_len: int) -> list[str]:
    """One prompt per series of x [B', T] (normalized values)."""
    mins, maxs = x.min(dim=1).values.tolist(), x.max(dim=1).values.tolist()
    medians = x.median(dim=1).values.tolist()
    trends = x.diff(dim=1).sum(dim=1).tolist()
    lags = top_lags(x).tolist()
    return [
        f"<|start_prompt|>Dataset description: {description} "
        f"Task description: forecast the next {pred_len} steps given the previous {seq_len} steps information; "
        f"Input statistics: min value {mn:.3f}, max value {mx:.3f}, median value {md:.3f}, "
        f"the trend of input is {'upward' if tr > 0 else 'downward'}, "
        f"top 5 lags are : {', '.join(map(str, lg))}<|end_prompt|>"
        for mn, mx, md, tr, lg in zip(mins, maxs, medians, trends, lags, strict=True)
    ]
