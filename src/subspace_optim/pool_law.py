"""How far I3S's randomized pool moves its sampling law (``selectors/importance.py``).

The full law draws r of the k singular directions by successive sampling without replacement with
weights ``w_i`` proportional to ``s_i`` (Plackett-Luce); the pooled law draws from the top ``K`` only
(weights ``w_i 1{i <= K}``). Drawn as Gumbel-top-r (``argtopk(log w_i + g_i)``), the two laws are
coupled by sharing the Gumbels ``g_i``: they pick the same set unless the full law's set holds an
index past ``K``. So their total variation distance (over sets, and over ordered draws as well) is

    TV = P_full(at least one of the r draws lies past K)

exactly: at most that by the coupling, at least that because the pooled law never draws past ``K``.
:func:`tail_draw_probability` computes it. With the Gumbel-max property, ``max`` over the tail of
``log w_i + g_i`` is ``log W_T + Gumbel``; writing ``E = W_T exp(-max)`` (standard exponential), each
head index beats the tail's best independently with probability ``1 - exp(-w_i E / W_T)``, and

    1 - TV = E_E[ P(at least r of the K head indices beat it) ],

a Poisson-binomial tail averaged over one exponential variable. The randomized method's estimated
``s^`` add a second, smaller term (the pooled law's weights are ``s^``, not ``s``), measured in
``benchmarks/i3s_pool_law.py``.
"""

from __future__ import annotations

import torch


def tail_draw_probability(singular_values: torch.Tensor, rank: int, pool: int, nodes: int = 4096
                          ) -> tuple[float, float]:
    """``(low, high)`` bounds on P_full(a draw past the top ``pool``), i.e. the TV distance above.

    ``singular_values`` (k,) are the sampler's weights up to a factor (zeros are never drawn).
    The average over ``E`` is taken as an integral over ``u = 1 - exp(-E)`` in [0, 1] on ``nodes``
    points log-spaced in ``E`` (1e-15 to 60: where the integrand moves, even for tiny tails). The
    integrand is monotone in ``u``, so the left and right sums bracket the exact value. Computed in
    float64; costs ``nodes * pool * rank`` operations.
    """
    w = singular_values.detach().to(torch.float64).flatten()
    w = w[w > 0]
    if rank < 1 or pool < rank:
        raise ValueError(f"need 1 <= rank <= pool, got rank={rank}, pool={pool}")
    head, tail = w[:pool], w[pool:]
    if tail.numel() == 0:
        return 0.0, 0.0
    if rank > head.numel():
        return 1.0, 1.0
    e = torch.cat([torch.zeros(1, dtype=torch.float64),
                   torch.logspace(-15, 1.78, nodes - 1, dtype=torch.float64)])  # (nodes,), up to ~60
    beat = -torch.expm1(-(head[None, :] * e[:, None]) / tail.sum())  # (nodes, K) P(head i beats)
    # Poisson-binomial DP over the head: counts 0..rank-1, plus the mass that reached rank
    counts = torch.zeros(nodes, rank, dtype=torch.float64)
    counts[:, 0] = 1.0
    reached = torch.zeros(nodes, dtype=torch.float64)
    for i in range(head.numel()):
        p = beat[:, i : i + 1]
        reached += counts[:, -1] * p[:, 0]
        counts = torch.cat([counts[:, :1] * (1 - p), counts[:, 1:] * (1 - p) + counts[:, :-1] * p], dim=1)
    # reached rises with u from 0 (u = 0) to 1 (u -> 1): bracket its integral by left/right sums
    u = torch.cat([-torch.expm1(-e), torch.ones(1, dtype=torch.float64)])
    du = u[1:] - u[:-1]
    right_values = torch.cat([reached[1:], torch.ones(1, dtype=torch.float64)])
    low_integral, high_integral = float((reached * du).sum()), float((right_values * du).sum())
    return max(0.0, 1.0 - high_integral), min(1.0, 1.0 - low_integral)
