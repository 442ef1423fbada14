"""Cost and payback: self-hosting the fine-tuned model vs a hosted API, from measured throughput.

Self-hosting is priced as the machines needed to serve the daily tokens at the throughput measured
by :mod:`ftkit.loadtest` (whole machines, at least one, running all month); the hosted API as tokens
times its price. The fine-tune pays back when the monthly saving has covered its one-off cost.
"""

from __future__ import annotations

import math

HOURS_PER_MONTH = 730.0
DAYS_PER_MONTH = 30.4


def monthly_costs(host, tokens_per_second: float) -> dict:
    """Monthly cost of both paths and the payback period, for ``host`` (a HostConfig).

    Args:
        host: ``requests_per_day``, ``tokens_per_request``, ``hosted_price_per_million_tokens``,
            ``machine_hourly_usd`` and ``fine_tune_cost_usd`` are read.
        tokens_per_second: sustained tokens/s one machine serves (the best measured level).

    Example:
        >>> from ftkit.config import HostConfig
        >>> round(monthly_costs(HostConfig(), 100.0)["hosted_monthly_usd"], 2)
        182.4
    """
    tokens_month = host.requests_per_day * host.tokens_per_request * DAYS_PER_MONTH
    hosted = tokens_month / 1e6 * host.hosted_price_per_million_tokens
    needed_tps = host.requests_per_day * host.tokens_per_request / 86_400  # average, over the whole day
    machines = max(1, math.ceil(needed_tps / tokens_per_second)) if tokens_per_second > 0 else math.inf
    self_hosted = machines * host.machine_hourly_usd * HOURS_PER_MONTH
    saving = hosted - self_hosted
    payback = host.fine_tune_cost_usd / saving if saving > 0 else math.inf
    return {"tokens_per_month": tokens_month, "needed_tokens_per_s": needed_tps,
            "measured_tokens_per_s": tokens_per_second, "machines": machines,
            "hosted_monthly_usd": hosted, "self_hosted_monthly_usd": self_hosted, "monthly_saving_usd": saving,
            "fine_tune_cost_usd": host.fine_tune_cost_usd, "payback_months": payback,
            "cost_per_million_tokens_self_hosted": self_hosted / (tokens_month / 1e6) if tokens_month else math.inf}


def cumulative(costs: dict, months: int = 24) -> list[dict]:
    """Cumulative spend per month of both paths (self-hosting starts with the fine-tune's cost)."""
    return [{"month": m, "hosted API": costs["hosted_monthly_usd"] * m,
             "fine-tuned, self-hosted": costs["fine_tune_cost_usd"] + costs["self_hosted_monthly_usd"] * m}
            for m in range(months + 1)]
