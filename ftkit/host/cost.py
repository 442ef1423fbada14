"""Cost and payback: self-hosting the fine-tuned model vs a hosted API, from measured throughput.

Self-hosting is priced as the machines needed to serve the daily requests at the requests/s measured
by :mod:`ftkit.host.loadtest` (whole machines, at least one, running all month); the hosted API as tokens
times its price. The fine-tune pays back when the monthly saving has covered its one-off cost.

Machines are sized on requests, not tokens: the load test counts generated (reply) tokens only,
while ``host.tokens_per_request`` is prompt + reply (what a hosted API bills), so dividing one by the
other would count each request's prompt as extra reply tokens the machine must generate.
"""

from __future__ import annotations

import math

HOURS_PER_MONTH = 730.0
DAYS_PER_MONTH = 30.4


def capacity(load: list[dict]) -> dict:
    """What one machine serves, from :func:`ftkit.host.loadtest.measure`'s levels: the level with the most
    requests/s, and the reply tokens its requests averaged (the size of request it was measured on).
    Returns the keyword arguments of :func:`monthly_costs`."""
    best = max(load, key=lambda level: level["requests_per_s"])
    return {"requests_per_second": best["requests_per_s"],
            "reply_tokens_per_request": best["completion_tokens"] / best["requests"] if best["requests"] else None}


def monthly_costs(host, requests_per_second: float, reply_tokens_per_request: float | None = None) -> dict:
    """Monthly cost of both paths and the payback period, for ``host`` (a HostConfig).

    Args:
        host: ``requests_per_day``, ``tokens_per_request``, ``hosted_price_per_million_tokens``,
            ``machine_hourly_usd`` and ``fine_tune_cost_usd`` are read.
        requests_per_second: sustained requests/s one machine serves (the best measured level).
        reply_tokens_per_request: the reply tokens of the measured requests (reported, not used:
            replies much longer than that take proportionally longer than measured).

    Example:
        >>> from ftkit.core.config import HostConfig
        >>> c = monthly_costs(HostConfig(), 0.5)
        >>> round(c["hosted_monthly_usd"], 2), c["machines"]
        (273.6, 1)
    """
    tokens_month = host.requests_per_day * host.tokens_per_request * DAYS_PER_MONTH
    hosted = tokens_month / 1e6 * host.hosted_price_per_million_tokens
    needed_rps = host.requests_per_day / 86_400  # average, over the whole day
    machines = max(1, math.ceil(needed_rps / requests_per_second)) if requests_per_second > 0 else math.inf
    self_hosted = machines * host.machine_hourly_usd * HOURS_PER_MONTH
    saving = hosted - self_hosted
    payback = host.fine_tune_cost_usd / saving if saving > 0 else math.inf
    return {"tokens_per_month": tokens_month, "needed_requests_per_s": needed_rps,
            "measured_requests_per_s": requests_per_second, "measured_reply_tokens_per_request": reply_tokens_per_request,
            "machines": machines,
            "hosted_monthly_usd": hosted, "self_hosted_monthly_usd": self_hosted, "monthly_saving_usd": saving,
            "fine_tune_cost_usd": host.fine_tune_cost_usd, "payback_months": payback,
            "cost_per_million_tokens_self_hosted": self_hosted / (tokens_month / 1e6) if tokens_month else math.inf}


def cumulative(costs: dict, months: int = 24) -> list[dict]:
    """Cumulative spend per month of both paths (self-hosting starts with the fine-tune's cost)."""
    return [{"month": m, "hosted API": costs["hosted_monthly_usd"] * m,
             "fine-tuned, self-hosted": costs["fine_tune_cost_usd"] + costs["self_hosted_monthly_usd"] * m}
            for m in range(months + 1)]
