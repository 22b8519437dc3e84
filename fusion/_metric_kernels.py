"""Compiled (numba) kernels behind the windowed fusion metrics VIF and SSIM.

Both metrics need, per output pixel, windowed moments of eight channels: the means of F, A and B
and of the products FF, AA, BB, FA and FB. Computing them as eight separate full-frame filterings
(and the per-pixel formula as a dozen full-frame array operations) is what made these metrics
slow. Here one pass over the rows does everything for one window size:

1. the eight product rows of one input row are formed once (5 multiplications per pixel);
2. each is filtered horizontally (separable filter; a symmetric window is folded so that each pair
   of taps costs one multiplication) into a ring buffer of the last ``n`` filtered rows;
3. once ``n`` rows are in the ring, the vertical pass gives the eight moments of one output row,
   and the metric's per-pixel formula runs on them at once, accumulating per column;

so every intermediate value lives in a few hundred kB of cache, never in full-frame arrays.
Only 'valid' outputs are computed (no padding): VIF uses exactly those, and SSIM averages the
interior that a 7x7 window with a 3-pixel crop leaves, which is the same set of pixels.

Layout conventions: images are C-contiguous float64 (H, W); the eight channels are numbered
F, A, B, FF, AA, BB, FA, FB = 0..7; ``ring`` is (8, n, Wo) with Wo = W - n + 1.

Accuracy: float64 throughout, no fast-math reassociation. Sums of products of logarithms are
taken as the logarithm of per-column products over blocks of rows (each factor is >= 1 and
bounded, see :func:`_flush_rows`), which changes the result by rounding only (about 1e-15
relative per block) and avoids one logarithm per pixel.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
# error_model="numpy": x / 0.0 is IEEE inf/nan (no Python exception, no per-division checks,
# which would also stop the loops from being vectorised); contract: a*b+c may become one FMA

_NCH = 8


@njit(**_JIT)
def _product_rows(F, A, B, y, cf, ca, cb, prod):
    """prod[c, :] = channel c of input row y (images shifted by cf, ca, cb)."""
    W = F.shape[1]
    for j in range(W):
        f = F[y, j] - cf
        a = A[y, j] - ca
        b = B[y, j] - cb
        prod[0, j] = f
        prod[1, j] = a
        prod[2, j] = b
        prod[3, j] = f * f
        prod[4, j] = a * a
        prod[5, j] = b * b
        prod[6, j] = f * a
        prod[7, j] = f * b


@njit(**_JIT)
def _sym_taps(out, w, src, ridx, coff, first_pair, npairs, init):
    """One pass over j for up to four symmetric tap pairs k in [first_pair, first_pair + npairs):
    out[j] (= or +=) sum_k w[k] (row_k[j] + row_{n-1-k}[j]) (+ w[r] row_r[j] when init), where
    row_k = src[ridx[k], coff[k]:coff[k] + Wo]. Four pairs per pass: ``out`` is loaded and stored
    once per four pairs rather than once per tap."""
    n = w.shape[0]
    r = n // 2
    Wo = out.shape[0]
    k = first_pair
    a0 = src[ridx[k], coff[k]:coff[k] + Wo]
    b0 = src[ridx[n - 1 - k], coff[n - 1 - k]:coff[n - 1 - k] + Wo]
    w0 = w[k]
    m = src[ridx[r], coff[r]:coff[r] + Wo]
    wr = w[r] if init else 0.0
    if init:
        for j in range(Wo):
            out[j] = 0.0
    if npairs == 4:
        a1 = src[ridx[k + 1], coff[k + 1]:coff[k + 1] + Wo]
        b1 = src[ridx[n - 2 - k], coff[n - 2 - k]:coff[n - 2 - k] + Wo]
        a2 = src[ridx[k + 2], coff[k + 2]:coff[k + 2] + Wo]
        b2 = src[ridx[n - 3 - k], coff[n - 3 - k]:coff[n - 3 - k] + Wo]
        a3 = src[ridx[k + 3], coff[k + 3]:coff[k + 3] + Wo]
        b3 = src[ridx[n - 4 - k], coff[n - 4 - k]:coff[n - 4 - k] + Wo]
        w1, w2, w3 = w[k + 1], w[k + 2], w[k + 3]
        for j in range(Wo):
            out[j] += (wr * m[j] + w0 * (a0[j] + b0[j]) + w1 * (a1[j] + b1[j])
                       + w2 * (a2[j] + b2[j]) + w3 * (a3[j] + b3[j]))
    elif npairs == 2:
        a1 = src[ridx[k + 1], coff[k + 1]:coff[k + 1] + Wo]
        b1 = src[ridx[n - 2 - k], coff[n - 2 - k]:coff[n - 2 - k] + Wo]
        w1 = w[k + 1]
        for j in range(Wo):
            out[j] += wr * m[j] + w0 * (a0[j] + b0[j]) + w1 * (a1[j] + b1[j])
    elif npairs == 1:
        for j in range(Wo):
            out[j] += wr * m[j] + w0 * (a0[j] + b0[j])
    else:  # a 1-tap window
        for j in range(Wo):
            out[j] += wr * m[j]


@njit(**_JIT)
def _sym_filter(out, w, src, ridx, coff):
    """out[j] = sum_k w[k] src[ridx[k], coff[k] + j] for a symmetric window w (taps k and n-1-k
    share one multiplication), in passes of up to four tap pairs."""
    r = w.shape[0] // 2
    done = 0
    while True:
        left = r - done
        step = 4 if left >= 4 else (2 if left >= 2 else left)
        _sym_taps(out, w, src, ridx, coff, done, step, done == 0)
        done += step
        if done >= r:
            break


@njit(**_JIT)
def _row_filter(prod, w, ring, slot, ridx, coff):
    """ring[c, slot, j] = sum_k w[k] prod[c, j + k], j in 0..Wo-1: the valid horizontal filter
    of each channel's row. ridx, coff: (n,) int64 scratch."""
    n = w.shape[0]
    for k in range(n):
        coff[k] = k
    for c in range(_NCH):
        for k in range(n):
            ridx[k] = c
        _sym_filter(ring[c, slot], w, prod, ridx, coff)


@njit(**_JIT)
def _col_filter(ring, w, first, mom, ridx, coff):
    """mom[c, j] = sum_k w[k] ring[c, (first + k) % n, j]: the vertical pass over the ring."""
    n = w.shape[0]
    for k in range(n):
        ridx[k] = (first + k) % n
        coff[k] = 0
    for c in range(_NCH):
        _sym_filter(mom[c], w, ring[c], ridx, coff)


@njit(**_JIT)
def _moment_buffers(W, n):
    """Scratch for :func:`_next_moments`: prod (8, W), ring (8, n, Wo), mom (8, Wo), two (n,)
    index arrays."""
    Wo = W - n + 1
    return (np.empty((_NCH, W)), np.empty((_NCH, n, Wo)), np.empty((_NCH, Wo)),
            np.empty(n, np.int64), np.empty(n, np.int64))


@njit(**_JIT)
def _next_moments(F, A, B, y, cf, ca, cb, w, bufs):
    """Feed input row y (images shifted by cf, ca, cb) through the separable window w; True when
    bufs' mom (8, Wo) then holds the eight windowed moments of output row y - n + 1."""
    prod, ring, mom, ridx, coff = bufs
    n = w.shape[0]
    _product_rows(F, A, B, y, cf, ca, cb, prod)
    _row_filter(prod, w, ring, y % n, ridx, coff)
    if y < n - 1:
        return False
    _col_filter(ring, w, (y - n + 1) % n, mom, ridx, coff)
    return True


@njit(**_JIT)
def _flush_rows(prod_acc, total):
    """total += sum_j log10(prod_acc[j]); prod_acc reset to 1. Returns the new total."""
    s = 0.0
    for j in range(prod_acc.shape[0]):
        s += math.log10(prod_acc[j])
        prod_acc[j] = 1.0
    return total + s


@njit(**_JIT)
def vif_scale(F, A, B, w, flush_every):
    """One scale of Sheikh-Bovik pixel VIF for both sources: (numA, denA, numB, denB).

    F, A, B: (H, W) float64, the scale's images; w: the scale's 1-D Gaussian (the 2-D window is
    its outer product), length n odd; 'valid' outputs only ((H-n+1) x (W-n+1)). Per pixel, with
    s1 = var(X), s2 = var(F), s12 = cov(X, F) over the window and eps = 1e-10, sigma_n^2 = 2:
    g = s12 / (s1 + eps), sv = s2 - g s12, then in the reference's order: s1 < eps -> g = 0,
    s1 = 0; s2 < eps -> g = 0; g < 0 -> g = 0 (sv = s2); sv = max(sv, eps) (wherever g ends up 0
    the numerator term is log10(1) = 0 whatever sv is, so only sv for g > 0 matters);
    num += log10(1 + g^2 s1 / (sv + 2)), den += log10(1 + s1 / 2).

    The images are shifted by their top-left pixel first (variances and covariances are shift
    invariant): a constant image then has exactly zero moments, so its vifp is exactly 0/0.
    flush_every: rows whose per-column products are multiplied before one log10 (the caller
    bounds each factor so that the products stay finite)."""
    H, W = F.shape
    n = w.shape[0]
    Wo = W - n + 1
    eps = 1e-10
    cf, ca, cb = F[0, 0], A[0, 0], B[0, 0]
    bufs = _moment_buffers(W, n)
    mom = bufs[2]
    pnA = np.ones(Wo)
    pdA = np.ones(Wo)
    pnB = np.ones(Wo)
    pdB = np.ones(Wo)
    numA = denA = numB = denB = 0.0
    pending = 0
    for y in range(H):
        if not _next_moments(F, A, B, y, cf, ca, cb, w, bufs):
            continue
        mF = mom[0]
        mFF = mom[3]
        for src in range(2):
            mX = mom[1 + src]
            mXX = mom[4 + src]
            mFX = mom[6 + src]
            pn = pnA if src == 0 else pnB
            pd = pdA if src == 0 else pdB
            for j in range(Wo):
                m1 = mX[j]
                m2 = mF[j]
                s1 = mXX[j] - m1 * m1
                s2 = mFF[j] - m2 * m2
                s12 = mFX[j] - m1 * m2
                ok1 = s1 >= eps
                s1 = s1 if ok1 else 0.0
                g = s12 / (s1 + eps)
                keep = ok1 & (s2 >= eps) & (s12 > 0.0)  # g > 0 <=> s12 > 0
                g = g if keep else 0.0
                sv = s2 - g * s12
                sv = sv if sv > eps else eps
                pn[j] *= 1.0 + g * g * s1 / (sv + 2.0)
                pd[j] *= 1.0 + 0.5 * s1
        pending += 1
        if pending == flush_every or y == H - 1:
            numA = _flush_rows(pnA, numA)
            denA = _flush_rows(pdA, denA)
            numB = _flush_rows(pnB, numB)
            denB = _flush_rows(pdB, denB)
            pending = 0
    return numA, denA, numB, denB


@njit(**_JIT)
def decimate(X, w):
    """valid_filter(X, outer(w, w))[::2, ::2]: the next VIF scale's image.

    (H, W) -> (ceil((H-n+1)/2), ceil((W-n+1)/2)). Rows are filtered horizontally as they come
    (ring of n rows); the vertical pass runs for the kept rows only."""
    H, W = X.shape
    n = w.shape[0]
    Hv = H - n + 1
    Wv = W - n + 1
    out = np.empty(((Hv + 1) // 2, (Wv + 1) // 2))
    ring = np.empty((n, Wv))
    col = np.empty(Wv)
    ridx = np.empty(n, np.int64)
    coff = np.empty(n, np.int64)
    for y in range(H):
        for k in range(n):
            ridx[k] = y
            coff[k] = k
        _sym_filter(ring[y % n], w, X, ridx, coff)
        i = y - n + 1
        if i < 0 or i % 2 == 1:
            continue
        for k in range(n):
            ridx[k] = (i + k) % n
            coff[k] = 0
        _sym_filter(col, w, ring, ridx, coff)
        dst = out[i // 2]
        for j in range(dst.shape[0]):
            dst[j] = col[2 * j]
    return out


@njit(**_JIT)
def ssim_pair(F, A, B, c1, c2):
    """(sum of the SSIM map of (F, A), of (F, B)) over the valid 7x7 windows.

    skimage's structural_similarity with a 7x7 uniform window and sample covariance, written in
    window sums S (= 49 x the window means), where the 49^4 factors cancel:
      (2 SF SX + K1)(2 cov (49 SFX - SF SX) + K2) / ((SF^2 + SX^2 + K1)(cov (49 SFF - SF^2 + 49 SXX - SX^2) + K2))
    with cov = 49/48, K = 49^2 C. For integer images every window sum and every 49 S2 - S^2
    difference is an exact integer in float64."""
    H, W = F.shape
    n = 7
    Wo = W - n + 1
    w = np.ones(n)
    cov = 49.0 / 48.0
    k1 = 2401.0 * c1
    k2 = 2401.0 * c2
    bufs = _moment_buffers(W, n)
    mom = bufs[2]
    accA = np.zeros(Wo)
    accB = np.zeros(Wo)
    for y in range(H):
        if not _next_moments(F, A, B, y, 0.0, 0.0, 0.0, w, bufs):
            continue
        sF = mom[0]
        sFF = mom[3]
        for src in range(2):
            sX = mom[1 + src]
            sXX = mom[4 + src]
            sFX = mom[6 + src]
            acc = accA if src == 0 else accB
            for j in range(Wo):
                f = sF[j]
                x = sX[j]
                p = f * x
                num = (2.0 * p + k1) * (2.0 * cov * (49.0 * sFX[j] - p) + k2)
                den = (f * f + x * x + k1) * (cov * (49.0 * sFF[j] - f * f + 49.0 * sXX[j] - x * x) + k2)
                acc[j] += num / den
    return accA.sum(), accB.sum()


# ----------------------------------------------------------------------------- Sobel-based metrics
# Sobel responses as correlations: gx = [[-1,0,1],[-2,0,2],[-1,0,1]] * X, gy = its transpose.
# The transcendental functions (atan, exp) are left to numpy, whose SIMD versions are several
# times faster than the scalar libm calls a compiled loop makes; the kernels below do everything
# else in single passes and hand numpy contiguous blocks of arguments.

@njit(**_JIT)
def _sobel_row(X, i, zero_pad, up, mid, dn, gx, gy):
    """gx, gy of row i of X. zero_pad: zeros outside the image (conv2 'same'); otherwise mirror
    without repeating the edge (reflect-101). up/mid/dn: (W,) scratch for the three rows."""
    H, W = X.shape
    for j in range(W):
        mid[j] = X[i, j]
    if i > 0:
        for j in range(W):
            up[j] = X[i - 1, j]
    elif zero_pad:
        up[:] = 0.0
    else:
        for j in range(W):
            up[j] = X[1, j]
    if i < H - 1:
        for j in range(W):
            dn[j] = X[i + 1, j]
    elif zero_pad:
        dn[:] = 0.0
    else:
        for j in range(W):
            dn[j] = X[H - 2, j]
    # interior columns: vectorised
    for j in range(1, W - 1):
        gx[j] = (up[j + 1] + 2.0 * mid[j + 1] + dn[j + 1]) - (up[j - 1] + 2.0 * mid[j - 1] + dn[j - 1])
        gy[j] = (dn[j - 1] + 2.0 * dn[j] + dn[j + 1]) - (up[j - 1] + 2.0 * up[j] + up[j + 1])
    for j in (0, W - 1):
        if j == 0:
            lu, lm, ld = (0.0, 0.0, 0.0) if zero_pad else (up[1], mid[1], dn[1])
            ru, rm, rd = up[1], mid[1], dn[1]
        else:
            lu, lm, ld = up[W - 2], mid[W - 2], dn[W - 2]
            ru, rm, rd = (0.0, 0.0, 0.0) if zero_pad else (up[W - 2], mid[W - 2], dn[W - 2])
        gx[j] = (ru + 2.0 * rm + rd) - (lu + 2.0 * lm + ld)
        gy[j] = (ld + 2.0 * dn[j] + rd) - (lu + 2.0 * up[j] + ru)


@njit(**_JIT)
def qabf_prepare(F, A, B, r0, g, t, scratch):
    """Rows r0 .. r0 + h of the zero-padded Sobel magnitudes g[k] and slopes t[k] = gy / gx
    (-inf where gx == 0, so that atan gives -pi/2) for k = F, A, B; g, t: (3, h, W).

    atan(gy/gx) is the reference's alpha = atan(Sy/Sx) negated (conv2 flips the sign of Sx), and
    its pi/2 for Sx == 0 becomes -pi/2: only |alpha_X - alpha_F| is used, which is unchanged."""
    h = g.shape[1]
    W = F.shape[1]
    up, mid, dn, gx, gy = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    for k in range(3):
        X = F if k == 0 else (A if k == 1 else B)
        for ii in range(h):
            _sobel_row(X, r0 + ii, True, up, mid, dn, gx, gy)
            gk = g[k, ii]
            tk = t[k, ii]
            for j in range(W):
                x = gx[j]
                y = gy[j]
                gk[j] = math.sqrt(x * x + y * y)
                tk[j] = y / x if x != 0.0 else -np.inf


_KA = 22.0 / (math.pi / 2)


@njit(**_JIT)
def qabf_arguments(g, a, e):
    """Exponent arguments of the two logistic factors of Q^XF, X = A, B: (4, h, W) into e.

    e[2s] = -15 (G - 0.5) with G = min/max of gX, gF (gF where gX == gF, as analysis_Qabf.m);
    e[2s+1] = -22 (A_alpha - 0.8) = (22 / (pi/2)) |aX - aF| - 4.4."""
    h, W = g.shape[1], g.shape[2]
    for s in range(2):
        for ii in range(h):
            gF = g[0, ii]
            aF = a[0, ii]
            gX = g[1 + s, ii]
            aX = a[1 + s, ii]
            eg = e[2 * s, ii]
            ea = e[2 * s + 1, ii]
            for j in range(W):
                x = gX[j]
                f = gF[j]
                G = min(x, f) / max(x, f) if x != f else f
                eg[j] = -15.0 * (G - 0.5)
                ea[j] = _KA * abs(aX[j] - aF[j]) - 4.4


@njit(**_JIT)
def qabf_sums(g, e):
    """(sum of Q^AF gA + Q^BF gB, sum of gA + gB) over the block; e holds exp of the arguments."""
    h, W = g.shape[1], g.shape[2]
    c = 0.9994 * 0.9879
    num = 0.0
    den = 0.0
    acc = np.zeros(W)
    accd = np.zeros(W)
    for s in range(2):
        for ii in range(h):
            gX = g[1 + s, ii]
            eg = e[2 * s, ii]
            ea = e[2 * s + 1, ii]
            for j in range(W):
                acc[j] += gX[j] / ((1.0 + eg[j]) * (1.0 + ea[j]))
                accd[j] += gX[j]
    for j in range(W):
        num += acc[j]
        den += accd[j]
    return c * num, den


@njit(**_JIT)
def nabf_dense(Fi, I1, I2, comp, scratch):
    """Dense part of Nabf (Tang's analysis_nabf.m, f = Fi, sources I1, I2).

    Reflect-101 padded Sobel /8: g = sqrt(gv^2 + gh^2) / 8 with gv = gx / 8, gh = gy / 8.
    Returns (den, m): den = sum(wA + wB) with w = g^1.5 where g >= 2 else 0.001, and the m pixels
    of the artefact mask na = gF > g1 and gF > g2 written into comp (6, >= m):
    comp[0..2] = g of f, I1, I2; comp[3..5] = their slopes gv/gh (0 where gv == gh == 0, so that
    atan gives the reference's 0; +-inf where only gh == 0)."""
    H, W = Fi.shape
    up, mid, dn = scratch[0], scratch[1], scratch[2]
    gxs = scratch[3:6]
    gys = scratch[6:9]
    gs = scratch[9:12]
    den_acc = np.zeros(W)
    m = 0
    for i in range(H):
        for k in range(3):
            X = Fi if k == 0 else (I1 if k == 1 else I2)
            _sobel_row(X, i, False, up, mid, dn, gxs[k], gys[k])
            gk = gs[k]
            gx = gxs[k]
            gy = gys[k]
            for j in range(W):
                gk[j] = 0.125 * math.sqrt(gx[j] * gx[j] + gy[j] * gy[j])
        for k in range(1, 3):
            gk = gs[k]
            for j in range(W):
                x = gk[j]
                den_acc[j] += x * math.sqrt(x) if x >= 2.0 else 0.001
        gF, g1, g2 = gs[0], gs[1], gs[2]
        for j in range(W):
            if gF[j] > g1[j] and gF[j] > g2[j]:
                for k in range(3):
                    comp[k, m] = gs[k][j]
                    x = gxs[k][j]
                    y = gys[k][j]
                    comp[3 + k, m] = x / y if (x != 0.0 or y != 0.0) else 0.0
                m += 1
    return den_acc.sum(), m


@njit(**_JIT)
def nabf_arguments(comp, m, e):
    """Exponent arguments on the m masked pixels, comp[3..5] holding the angles by now:
    e[2s] = -19 (G - 0.5), G = min/max of gX, gF (0 where gX == 0); e[2s+1] = -22 (Aa - 0.5),
    Aa = ||aX - aF| - pi/2| 2/pi."""
    for s in range(2):
        for q in range(m):
            gX = comp[1 + s, q]
            gF = comp[0, q]
            G = min(gX, gF) / max(gX, gF) if gX != 0.0 else 0.0
            Aa = abs(abs(comp[4 + s, q] - comp[3, q]) - math.pi / 2) * (2.0 / math.pi)
            e[2 * s, q] = -19.0 * (G - 0.5)
            e[2 * s + 1, q] = -22.0 * (Aa - 0.5)


@njit(**_JIT)
def nabf_numerator(comp, m, e):
    """sum over the masked pixels of (1 - Q^1F) w1 + (1 - Q^2F) w2, e holding exp of the arguments;
    Q = sqrt(0.9999 / (1 + e_g) * 0.9995 / (1 + e_a))."""
    c = 0.9999 * 0.9995
    num = 0.0
    for s in range(2):
        for q in range(m):
            gX = comp[1 + s, q]
            w = gX * math.sqrt(gX) if gX >= 2.0 else 0.001
            Q = math.sqrt(c / ((1.0 + e[2 * s, q]) * (1.0 + e[2 * s + 1, q])))
            num += (1.0 - Q) * w
    return num


# ----------------------------------------------------------------------------- SF and AG
@njit(**_JIT)
def gradient_sums(F):
    """(sum (F[i,j] - F[i,j-1])^2, sum (F[i,j] - F[i-1,j])^2, sum sqrt((Gx^2 + Gy^2) / 2)).

    Gx, Gy as np.gradient / MATLAB gradient: (F[., j+1] - F[., j-1]) / 2 inside, one-sided
    differences at the borders. One pass over F; per-column accumulators (vectorised)."""
    H, W = F.shape
    sx = np.zeros(W)
    sy = np.zeros(W)
    sa = np.zeros(W)
    gx = np.empty(W)
    for i in range(H):
        row = F[i]
        up = F[i - 1] if i > 0 else F[i]
        dn = F[i + 1] if i < H - 1 else F[i]
        for j in range(1, W):
            d = row[j] - row[j - 1]
            sx[j] += d * d
        if i > 0:
            for j in range(W):
                d = row[j] - up[j]
                sy[j] += d * d
        for j in range(1, W - 1):
            gx[j] = 0.5 * (row[j + 1] - row[j - 1])
        gx[0] = row[1] - row[0]
        gx[W - 1] = row[W - 1] - row[W - 2]
        fy = 0.5 if 0 < i < H - 1 else 1.0  # central difference inside, one-sided at the borders
        for j in range(W):
            gy = fy * (dn[j] - up[j])
            sa[j] += math.sqrt(0.5 * (gx[j] * gx[j] + gy * gy))
    return sx.sum(), sy.sum(), sa.sum()


# ----------------------------------------------------------------------------- moment sums
@njit(**_JIT)
def moment_sums(F, A, B):
    """(sum F, sum A, sum B, sum FF, sum AA, sum BB, sum AF, sum BF, sum AB) in one pass.

    Per-column accumulators (vectorised). For integer images 0..255 every partial sum is an
    integer below 2^53 (fewer than 1.4e11 pixels), so the sums are exact in any order."""
    H, W = F.shape
    acc = np.zeros((9, W))
    for i in range(H):
        f = F[i]
        a = A[i]
        b = B[i]
        for j in range(W):
            x = f[j]
            y = a[j]
            z = b[j]
            acc[0, j] += x
            acc[1, j] += y
            acc[2, j] += z
            acc[3, j] += x * x
            acc[4, j] += y * y
            acc[5, j] += z * z
            acc[6, j] += y * x
            acc[7, j] += z * x
            acc[8, j] += y * z
    out = np.zeros(9)
    for k in range(9):
        out[k] = acc[k].sum()
    return out
