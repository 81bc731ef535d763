"""A hand-written, step-by-step SGD-SaI (docs/sgdsai.md), independent of memopt's code paths (plain loops, fp64)."""

import math



def reference_sgdsai(params, grads_per_step, *, lr, momentum, weight_decay, eps, scale, maximize=False):
    """params: list of fp64 tensors (copied). grads_per_step: list over steps of lists of grads (or None)."""
    params = [p.detach().clone().double() for p in params]
    bufs = [None] * len(params)
    snr = [None] * len(params)
    for grads in grads_per_step:
        # g-SNR for tensors that get their first non-zero gradient now
        for i, g in enumerate(grads):
            if g is None or snr[i] is not None or scale == "sqrt_numel":
                continue
            g = g.double().flatten()
            n = g.numel()
            norm = math.sqrt(sum(x * x for x in g.tolist()))
            if norm == 0.0:
                continue
            if n == 1:
                snr[i] = 1.0
                continue
            mean = sum(g.tolist()) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in g.tolist()) / (n - 1))
            snr[i] = math.sqrt(n) if std <= 1e-6 * norm / math.sqrt(n) else norm / (std + eps)
        known = [s for s in snr if s is not None]
        smax = max(known) if known else 1.0
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            if maximize:
                g = -g
            p = params[i]
            if scale == "sqrt_numel":
                sc = math.sqrt(p.numel())
            elif snr[i] is None:
                params[i] = p * (1 - lr * weight_decay)
                continue
            else:
                sc = snr[i] / smax if scale == "gsnr_max" else snr[i]
            if momentum == 0:
                m = g
            elif bufs[i] is None:
                m = g.clone()
            else:
                m = momentum * bufs[i] + (1 - momentum) * g
            if momentum != 0:
                bufs[i] = m
            p = p * (1 - lr * weight_decay)
            params[i] = p - lr * sc * m
    return params


def reference_factored(params, grads_per_step, *, lr, momentum, weight_decay, eps, maximize=False, clip=3.0):
    """scale="factored", written out with loops in fp64: per element u = g / (sqrt(R_i C_j / M) + eps) clamped to
    [-clip, clip] (rows = shape[0], columns = the rest; a vector: u = g / (|g| + eps)), m = β m + (1 − β) u from
    m = 0, and
    θ ← θ(1 − lr λ) − lr m / (1 − β^t). A tensor starts counting t at its first non-zero gradient."""
    params = [p.detach().clone().double() for p in params]
    bufs = [None] * len(params)
    steps = [0] * len(params)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            if maximize:
                g = -g
            p = params[i]
            if steps[i] == 0 and not bool((g != 0).any()):
                params[i] = p * (1 - lr * weight_decay)
                continue
            if g.dim() < 2:
                u = [x / (abs(x) + eps) for x in g.tolist()]
                u = g.new_tensor(u)
            else:
                rows = g.reshape(g.shape[0], -1).tolist()
                n_r, n_c = len(rows), len(rows[0])
                R = [sum(x * x for x in row) / n_c for row in rows]
                C = [sum(rows[i][j] ** 2 for i in range(n_r)) / n_r for j in range(n_c)]
                M = sum(R) / n_r
                u = [[rows[i][j] / (math.sqrt(R[i] * C[j] / M) + eps) if M > 0 else 0.0 for j in range(n_c)]
                     for i in range(n_r)]
                if clip is not None:
                    u = [[min(max(x, -clip), clip) for x in row] for row in u]
                u = g.new_tensor(u).reshape(g.shape)
            steps[i] += 1
            if momentum == 0:
                m = u
            else:
                bufs[i] = (momentum * bufs[i] if bufs[i] is not None else 0) + (1 - momentum) * u
                m = bufs[i] / (1 - momentum ** steps[i])
            params[i] = p * (1 - lr * weight_decay) - lr * m
    return params
