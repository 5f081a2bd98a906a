"""Two baseline feature learners for the face-neuron table: k-means on whitened patches, and a
small fully connected autoencoder (Le et al. 2012's second table: "k-means", "3-layer autoencoder").

Both take the unlabeled pool as (N, C, H, W) float32, already normalised per image by the
caller (``preprocess.normalize(x, "standardize")``), and give every unit's response to a batch
of images as the (examples x units) matrices ``neuronscore.choose_and_test`` scores:

- ``KMeansFeatures``: patches normalised, ZCA-whitened and clustered by spherical k-means (Coates
  et al. 2011; Coates, Karpathy & Ng 2012); ``{"kmeans.centroid": (N, k)}``.
- ``AutoencoderFeatures``: three tanh hidden layers and a mirrored decoder trained by Adam on the
  squared reconstruction error; ``{"ae.hidden1": ..., "ae.hidden2": ..., "ae.hidden3": ...}``.

Each class's docstring gives its defaults, how they were chosen and the measured fit seconds
(``benchmarks/facebaselines.py``). Pure NumPy.
"""

from __future__ import annotations

import time

import numpy as np

# Coates et al. 2011 normalise a patch as (p - mean) / sqrt(var + 10) on the [0, 255] scale. 10
# is 1.5e-4 on [0, 1]; the pool's median image variance is 0.144^2 = 0.021 on [0, 1], so on the
# per-image standardised scale (unit image variance) the same floor is 0.0075: 0.01 here. It only
# matters for nearly flat patches, whose noise it keeps from being blown up to unit contrast.
NORM_EPS = 0.01
# ZCA's regulariser as a fraction of the mean eigenvalue: Coates et al.'s 0.1 was absolute on
# normalised patches, whose mean eigenvalue is about 1, so the fraction means the same thing.
ZCA_EPS = 0.1


def check_images(x, what: str = "x") -> np.ndarray:
    """``x`` as float32 (N, C, H, W), or a ValueError naming what is wrong."""
    a = np.asarray(x)
    if a.ndim != 4 or a.size == 0 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} must be non-empty numeric images (N, C, H, W), got {a.dtype} of shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values ({int((~np.isfinite(a)).sum())} of them)")
    return a


def patches(x: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """Every ``patch`` x ``patch`` window on a ``stride`` grid: (N, C, H, W) -> (N, positions, C*patch*patch)."""
    n, c, h, w = x.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (patch, patch), axis=(2, 3))[:, :, ::stride, ::stride]
    # (N, C, Py, Px, p, p) -> (N, Py, Px, C, p, p): a patch is flattened channel by channel like a frame
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n, -1, c * patch * patch)


def normalize_patches(p: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """Each row to mean 0 and variance var / (var + eps) (``NORM_EPS``)."""
    p = p - p.mean(axis=-1, keepdims=True)
    return p / np.sqrt((p * p).mean(axis=-1, keepdims=True) + eps)


def zca(p: np.ndarray, eps: float = ZCA_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix) of ZCA whitening fitted on the rows of ``p``: z = (p - mean) @ matrix, with
    matrix = U diag(1 / sqrt(s + eps * mean(s))) U^T from the covariance's eigenvalues s."""
    p = np.asarray(p, np.float64)
    mean = p.mean(axis=0)
    s, u = np.linalg.eigh((p - mean).T @ (p - mean) / len(p))
    s = np.maximum(s, 0.0)  # rounding can leave the smallest eigenvalues a hair below zero
    return mean, (u * (1.0 / np.sqrt(s + eps * s.mean()))) @ u.T


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _assign(z: np.ndarray, cent: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best centroid (largest dot product) and that dot product."""
    a, best = np.empty(len(z), np.int64), np.empty(len(z), np.float64)
    for i in range(0, len(z), chunk):
        s = z[i : i + chunk] @ cent.T
        a[i : i + chunk] = s.argmax(axis=1)
        best[i : i + chunk] = s[np.arange(len(s)), a[i : i + chunk]]
    return a, best


def _sums(z: np.ndarray, a: np.ndarray, k: int) -> np.ndarray:
    """Each centroid's sum of its rows (sorted by centroid, then one reduceat: no k-sized product)."""
    counts = np.bincount(a, minlength=k)
    starts, has = np.r_[0, np.cumsum(counts)[:-1]], counts > 0
    sums = np.zeros((k, z.shape[1]), z.dtype)
    sums[has] = np.add.reduceat(z[np.argsort(a, kind="stable")], starts[has], axis=0)
    return sums


def _plus_plus(z: np.ndarray, k: int, norms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with the spherical residual ||z|| - max w.z as the squared distance."""
    idx = [int(rng.integers(len(z)))]
    best = z @ _unit(z[idx[0]])
    for _ in range(1, k):
        r = np.maximum(norms - best, 0.0)
        j = int(rng.choice(len(z), p=r / r.sum())) if r.sum() > 0 else int(rng.integers(len(z)))
        idx.append(j)
        best = np.maximum(best, z @ _unit(z[j]))
    return _unit(z[idx])


def spherical_kmeans(
    z: np.ndarray, k: int, *, iters: int = 30, init="random", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spherical k-means (Dhillon & Modha 2001): unit centroids w maximising sum_i max_c w_c . z_i.

    Returns (centroids (k, d), assignments (n,), history). ``init``: "random" (k distinct rows,
    made unit), "kmeans++", or a (k, d) array. Stops after ``iters`` rounds or when no assignment
    changes. ``history["inertia"]`` is sum_i ||z_i|| - w_{a_i} . z_i (>= 0) at each assignment:
    it never increases, since assigning to the best centroid and then setting each centroid to its
    members' normalised sum each raise the objective. A centroid left with no member (or a zero
    sum) is re-seeded at the row its centroid serves worst, distinct rows for several.
    """
    z = np.asarray(z)
    n = len(z) if z.ndim else 0
    if z.ndim != 2 or not 1 <= k <= n:
        raise ValueError(f"spherical_kmeans needs (n, d) rows and 1 <= k <= n, got shape {z.shape} and k = {k}")
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(z, axis=1).astype(np.float64)
    if isinstance(init, np.ndarray) and init.shape == (k, z.shape[1]):
        cent = _unit(init.astype(z.dtype))
    elif isinstance(init, str) and init in ("random", "kmeans++"):
        cent = _unit(z[rng.choice(n, k, replace=False)]) if init == "random" else _plus_plus(z, k, norms, rng)
    else:
        raise ValueError(f"init must be 'random', 'kmeans++' or a ({k}, {z.shape[1]}) array, got {init!r}")
    history: dict = {"inertia": [], "reseeded": 0, "changed": []}
    prev = None
    for _ in range(iters):
        a, best = _assign(z, cent)
        history["inertia"].append(float((norms - best).sum()))
        history["changed"].append(n if prev is None else int((a != prev).sum()))
        if history["changed"][-1] == 0:
            break
        prev = a
        sums = _sums(z, a, k)
        new = _unit(sums)
        empty = np.linalg.norm(sums, axis=1) == 0  # no member, or members that cancel
        if empty.any():
            # the rows worst served by their centroid: the largest residuals, one row per empty centroid
            worst = np.argsort(-(norms - best), kind="stable")[: int(empty.sum())]
            new[empty] = _unit(z[worst])
            history["reseeded"] += int(empty.sum())
        cent = new
    return cent, (prev if prev is not None else _assign(z, cent)[0]), history


class KMeansFeatures:
    """k-means features (Coates et al. 2011; Coates, Karpathy & Ng 2012), one unit per centroid.

    ``fit``: square patches (``patch``: pixels, a fraction of the frame's side, or None for the
    whole frame as in Le et al.'s table) are normalised one by one (``NORM_EPS``), ZCA-whitened
    (``ZCA_EPS``) and clustered by ``spherical_kmeans``; smaller patches are ``n_patches`` windows
    at random positions of random frames. ``activations``: each unit centroid's dot product with
    the whitened patch, the maximum over a ``stride`` grid of positions for smaller patches.

    Spherical k-means with dot-product responses rather than plain k-means with the triangle code:
    it is what Coates, Karpathy & Ng used for object-selective units; a unit is one linear filter
    of the whitened input, graded on every image as a network's neuron is, whereas the triangle
    code is zero wherever the centroid is farther than average (about half of all pairs); and it
    clusters by direction, so a patch's contrast does not pick its cluster. Bound: |response| <=
    ||whitened patch||. Random-sample seeding (k-means++ costs k passes over the data; empty
    clusters are re-seeded anyway).

    Defaults, chosen on the validation half of the eval (``benchmarks/facebaselines.py``; 4,000
    32x32 frames; k = 1024; mean over seeds of the chosen unit's balanced accuracy / AUC on the
    validation half): whole frame 0.83 / 0.84 (fit ~1 s: its k is bounded by the 4,000 frames, not
    by time), 8-pixel patches 0.83 / 0.86, 16: 0.87 / 0.93, 24 (3/4 of the frame): 0.89 / 0.95 at
    stride 4, 0.93 / 0.97 at stride 2. k = 2048 at 24 pixels scored no better (0.88 / 0.94) and
    took 40-71 s. So: ``patch=0.75, stride=2, k=1024``, 60,000 patches, 30 rounds at most: 21-46 s
    to fit on two cores shared with other work.
    """

    name = "kmeans"

    def __init__(
        self,
        k: int = 1024,
        patch: float | None = 0.75,
        seed: int = 0,
        *,
        stride: int = 2,
        n_patches: int = 60_000,
        iters: int = 30,
        init: str = "random",
        norm_eps: float = NORM_EPS,
        zca_eps: float = ZCA_EPS,
    ):
        if patch is not None and not (0 < patch < 1 or (patch >= 1 and float(patch).is_integer())):
            raise ValueError(f"patch must be pixels (an int), a fraction of the side in (0, 1), or None: {patch}")
        if min(int(k), int(stride), int(n_patches), int(iters)) < 1:
            raise ValueError(f"k, stride, n_patches and iters must be >= 1, got {k}, {stride}, {n_patches}, {iters}")
        self.k, self.patch, self.seed = int(k), patch, int(seed)
        self.stride, self.n_patches, self.iters, self.init = int(stride), int(n_patches), int(iters), init
        self.norm_eps, self.zca_eps = float(norm_eps), float(zca_eps)
        self.shape: tuple[int, ...] | None = None
        self.history: dict = {}
        self.size, self.seconds = 0, 0.0  # size: the patch's side in pixels, once fitted

    def _size(self, h: int, w: int) -> int:
        if self.patch is None:
            if h != w:
                raise ValueError(f"the whole-frame patch needs square frames, got {h}x{w}: give patch=")
            return h
        p = int(self.patch) if self.patch >= 1 else max(1, round(self.patch * min(h, w)))
        if p > min(h, w):
            raise ValueError(f"patch {p} is larger than the frames ({h}x{w})")
        return p

    def fit(self, x_pool) -> KMeansFeatures:
        x = check_images(x_pool, "x_pool")
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        n, c, h, w = x.shape
        p = self._size(h, w)
        if p == h == w:
            rows = x.reshape(n, -1)
        else:
            m = self.n_patches
            i, r, s = rng.integers(n, size=m), rng.integers(h - p + 1, size=m), rng.integers(w - p + 1, size=m)
            rows = np.lib.stride_tricks.sliding_window_view(x, (p, p), axis=(2, 3))[i, :, r, s].reshape(m, c * p * p)
        if self.k > len(rows):
            raise ValueError(f"k = {self.k} is more than the number of patches to cluster ({len(rows)})")
        rows = normalize_patches(rows.astype(np.float64), self.norm_eps)
        mean, W = zca(rows, self.zca_eps)
        z = ((rows - mean) @ W).astype(np.float32)
        cent, _, self.history = spherical_kmeans(z, self.k, iters=self.iters, init=self.init, seed=self.seed)
        # response = normalised patch @ (W @ centroids^T) - mean @ (W @ centroids^T): whitening folded in
        self.filters = (W @ cent.T.astype(np.float64)).astype(np.float32)
        self.offset = (mean @ self.filters.astype(np.float64)).astype(np.float32)
        self.zca_mean, self.zca_matrix, self.centroids = mean, W, cent
        self.shape, self.size, self.n_rows = x.shape[1:], p, len(rows)
        self.seconds = time.perf_counter() - t0
        return self

    def activations(self, x, chunk: int = 256) -> dict[str, np.ndarray]:
        if self.shape is None:
            raise ValueError("KMeansFeatures: call fit before activations")
        x = check_images(x)
        if x.shape[1:] != self.shape:
            raise ValueError(f"x has images of shape {x.shape[1:]}, the features were fitted on {self.shape}")
        out = np.empty((len(x), self.k), np.float32)
        for i in range(0, len(x), chunk):
            rows = normalize_patches(patches(x[i : i + chunk], self.size, self.stride), self.norm_eps)
            out[i : i + chunk] = (rows @ self.filters - self.offset).max(axis=1)
        return {"kmeans.centroid": out}

    def info(self) -> dict:
        inertia = self.history.get("inertia", [None])
        frame = self.shape is not None and self.size == self.shape[1] == self.shape[2]
        out = {k: getattr(self, k) for k in ("name", "k", "seed", "init", "iters", "n_patches", "norm_eps", "zca_eps")}
        out.update(patch="frame" if frame or self.patch is None else self.size or self.patch, iterations=len(inertia))
        out.update(stride=None if frame else self.stride, patches_clustered=getattr(self, "n_rows", 0))
        out.update(reseeded=self.history.get("reseeded", 0), inertia_first=inertia[0], inertia_last=inertia[-1])
        return {**out, "seconds": round(self.seconds, 3)}


def init_params(sizes, rng: np.random.Generator, dtype=np.float32) -> list[np.ndarray]:
    """[W1, b1, W2, b2, ...] for layers sizes[0] -> sizes[1] -> ...: Glorot-uniform weights, zero biases."""
    out = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        lim = np.sqrt(6.0 / (a + b))
        out += [rng.uniform(-lim, lim, (a, b)).astype(dtype), np.zeros(b, dtype)]
    return out


def ae_forward(params: list[np.ndarray], x: np.ndarray, linear_last: bool = True) -> list[np.ndarray]:
    """Every layer's output, input first: tanh units, the last layer linear if ``linear_last``."""
    hs = [x]
    n_layers = len(params) // 2
    for i in range(n_layers):
        a = hs[-1] @ params[2 * i] + params[2 * i + 1]
        hs.append(a if linear_last and i == n_layers - 1 else np.tanh(a))
    return hs


def ae_loss_grad(params: list[np.ndarray], x: np.ndarray, weight_decay: float = 0.0):
    """(loss, gradients) of 0.5 * mean_i ||reconstruction_i - x_i||^2 + 0.5 * weight_decay * sum ||W||^2."""
    hs = ae_forward(params, x)
    n = len(x)
    err = hs[-1] - x
    loss = 0.5 * float((err * err).sum()) / n
    n_layers = len(params) // 2
    grads: list[np.ndarray] = [np.empty(0)] * len(params)
    d = err / n
    for i in reversed(range(n_layers)):
        if i < n_layers - 1:
            d = d * (1.0 - hs[i + 1] * hs[i + 1])  # tanh' = 1 - tanh^2
        W = params[2 * i]
        grads[2 * i] = hs[i].T @ d + weight_decay * W
        grads[2 * i + 1] = d.sum(axis=0)
        loss += 0.5 * weight_decay * float((W * W).sum())
        if i:
            d = d @ W.T
    return loss, grads


class AutoencoderFeatures:
    """A fully connected autoencoder: pixels -> hidden1 -> hidden2 -> hidden3 -> hidden2 -> hidden1
    -> pixels, tanh hidden units, linear output, squared reconstruction loss plus a small L2
    weight decay, trained end to end by minibatch Adam (Kingma & Ba 2015; our own code).

    End to end rather than stacked layer by layer: one loss and one backward pass, which one
    gradient check covers; tanh units (smooth, centred) and Adam train the three layers without
    greedy pretraining. A unit of ``ae.hiddenN`` is the encoder's Nth hidden layer's output.

    ``history``: the minibatch loss averaged over every ``log_every`` steps ({"step", "loss"});
    ``info()`` adds its first and last values, the last also as a fraction of 0.5 mean ||x||^2
    (reconstructing every frame as its own mean, zero after per-image standardisation).

    Defaults: hidden (256, 128, 64), 3,000 steps of 128 frames (96 passes over 4,000 frames), lr
    1e-3, weight decay 1e-4: 20-52 s to fit on the eval's pool (4,000 32x32 frames) on two cores
    shared with other work (6 ms a step when they are idle); the loss falls to ~0.19 of the zero
    reconstruction's. 6,000 steps (~0.17) chose no better unit on the validation half.
    """

    name = "autoencoder"

    def __init__(
        self,
        hidden=(256, 128, 64),
        steps: int = 3000,
        seed: int = 0,
        *,
        batch: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        log_every: int = 50,
    ):
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1 or min(steps, batch, log_every) < 1 or not lr > 0 or weight_decay < 0:
            raise ValueError(
                f"need positive hidden widths, steps, batch, log_every and lr, and weight_decay >= 0; got {hidden}, "
                f"{steps}, {batch}, {log_every}, {lr}, {weight_decay}"
            )
        self.hidden, self.steps, self.seed, self.batch = hidden, int(steps), int(seed), int(batch)
        self.lr, self.weight_decay, self.log_every = float(lr), float(weight_decay), int(log_every)
        self.params: list[np.ndarray] = []
        self.shape: tuple[int, ...] | None = None
        self.history: dict = {"step": [], "loss": []}
        self.seconds, self.zero_loss = 0.0, float("nan")

    def fit(self, x_pool) -> AutoencoderFeatures:
        x = check_images(x_pool, "x_pool")
        t0 = time.perf_counter()
        flat = x.reshape(len(x), -1)
        rng = np.random.default_rng(self.seed)
        params = init_params((flat.shape[1], *self.hidden, *self.hidden[-2::-1], flat.shape[1]), rng)
        m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        bs = min(self.batch, len(flat))
        order, pos = rng.permutation(len(flat)), 0
        self.history = {"step": [], "loss": []}
        acc = []
        for t in range(1, self.steps + 1):
            if pos + bs > len(flat):  # a new epoch: a new order
                order, pos = rng.permutation(len(flat)), 0
            loss, grads = ae_loss_grad(params, flat[order[pos : pos + bs]], self.weight_decay)
            pos += bs
            acc.append(loss)
            lr_t = self.lr * np.sqrt(1 - b2**t) / (1 - b1**t)  # Adam's bias corrections folded into the step
            for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                mi *= b1
                mi += (1 - b1) * g
                vi *= b2
                vi += (1 - b2) * (g * g)
                p -= lr_t * mi / (np.sqrt(vi) + eps)
            if t % self.log_every == 0 or t == self.steps:
                self.history["step"].append(t)
                self.history["loss"].append(float(np.mean(acc)))
                acc = []
        self.params, self.shape = params, x.shape[1:]
        self.zero_loss = 0.5 * float((flat.astype(np.float64) ** 2).sum(axis=1).mean())
        self.seconds = time.perf_counter() - t0
        return self

    def activations(self, x, chunk: int = 1024) -> dict[str, np.ndarray]:
        if self.shape is None:
            raise ValueError("AutoencoderFeatures: call fit before activations")
        x = check_images(x)
        if x.shape[1:] != self.shape:
            raise ValueError(f"x has images of shape {x.shape[1:]}, the autoencoder was fitted on {self.shape}")
        flat = x.reshape(len(x), -1)
        n_enc = len(self.hidden)
        out = {f"ae.hidden{i + 1}": np.empty((len(x), h), np.float32) for i, h in enumerate(self.hidden)}
        for j in range(0, len(x), chunk):
            hs = ae_forward(self.params[: 2 * n_enc], flat[j : j + chunk], linear_last=False)
            for i in range(n_enc):
                out[f"ae.hidden{i + 1}"][j : j + chunk] = hs[i + 1]
        return out

    def info(self) -> dict:
        losses = self.history["loss"] or [None]
        out = {k: getattr(self, k) for k in ("name", "steps", "batch", "lr", "weight_decay", "seed")}
        relative = None if losses[-1] is None else losses[-1] / self.zero_loss
        out.update(hidden=list(self.hidden), loss_first=losses[0], loss_last=losses[-1], loss_last_relative=relative)
        return {**out, "seconds": round(self.seconds, 3)}
