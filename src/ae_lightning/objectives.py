"""Training objectives as pure tensor functions: reconstruction, KL, bounds, quantisation.

Per-image quantities are summed over pixels and latent dimensions and averaged over the
batch, so the VAE's numbers are nats per image, as in PyTorch's ``examples/vae``, and
comparable with papers' on binarised pixels (on grey ones a Bernoulli "likelihood" is not a
normalised density). (The plain autoencoder's ``mse`` is per pixel, as before.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

LIKELIHOODS = ("bernoulli", "gaussian")
CORRUPTIONS = ("none", "gaussian", "mask")


def reconstruction_nats(outputs: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x | z) per image, averaged over the batch: the normalised density, so a
    negative ELBO built on it bounds the importance-sampled ``test/nll`` from above.

    ``bernoulli``: binary cross-entropy of the pixels in [0, 1]; ``outputs`` are the decoder's
    logits (before the sigmoid), which is exact and stable where probabilities saturate.
    ``gaussian``: -log N(x; outputs, 1/2) per pixel, the squared error plus ``log(pi)/2``
    (the constant moves no gradient, but without it the ELBO and the NLL disagree);
    ``outputs`` are pixels. :func:`log_likelihood` is the same density, per sample.
    """
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(outputs, x, reduction="none")
    elif likelihood == "gaussian":
        per_pixel = (outputs - x).square() + 0.5 * math.log(math.pi)
    else:
        raise ValueError(f"Unknown likelihood {likelihood!r}: choose one of {list(LIKELIHOODS)}.")
    return per_pixel.flatten(1).sum(dim=1).mean()


def summed_squared_error(outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||outputs - x||^2 summed over each image's pixels, batch-averaged: the reconstruction
    term of the regularised deterministic families (sparse, contractive, WAE, RAE, VQ-VAE)."""
    return (outputs - x).square().flatten(1).sum(dim=1).mean()


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) in closed form, summed over z, batch-averaged."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=1).mean()


def reparameterise(
    mean: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mean + sigma * eps, eps ~ N(0, I): a sample whose gradient reaches mean and sigma."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * log_var) * eps


def kl_weight(beta: float, step: int, warmup_steps: int) -> float:
    """beta, ramped linearly from 0 over the first ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def corrupt(x: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """The denoising autoencoder's input: ``x`` plus N(0, level^2) noise, or pixels zeroed
    with probability ``level`` (``mask``). ``none`` returns ``x`` itself."""
    if kind == "none" or level == 0:
        return x
    if kind == "gaussian":
        return x + level * torch.randn_like(x)
    if kind == "mask":
        return x * (torch.rand_like(x) >= level)
    raise ValueError(f"Unknown corruption {kind!r}: choose one of {list(CORRUPTIONS)}.")


# --- regularisers of the deterministic families (sparse, contractive, wae, rae) -------------


def l1_sparsity(codes: torch.Tensor) -> torch.Tensor:
    """sum_j |z_j| per image, batch-averaged: the L1 sparsity penalty on the code
    (Goodfellow, Bengio & Courville 2016, "Deep Learning", section 14.2.1)."""
    return codes.abs().sum(dim=1).mean()


FIRING_EPS = 1e-6  # representable beside 1 in float32 (its spacing there is 6e-8)


def kl_sparsity(firing: torch.Tensor, target: float) -> torch.Tensor:
    """sum_j KL(Bernoulli(target) || Bernoulli(rho_j)), rho_j the batch mean of ``firing[:, j]``.

    Ng's sparse autoencoder penalty (Ng 2011, "Sparse autoencoder", CS294A lecture notes,
    section 3): ``firing`` ``(B, units)`` holds each hidden unit's activation in (0, 1) per
    image, and the penalty pulls every unit's mean activation towards ``target``.
    (``validate_args=False``: the check would read a value back to the host each step.)
    A unit that fires exactly 0 or 1 on every image (a sigmoid saturates to 1.0 in float32
    from a pre-activation of about 17) would make the penalty infinite: its rate is kept
    ``FIRING_EPS`` inside (0, 1), so the loss stays finite.
    """
    rho = firing.mean(dim=0).clamp(FIRING_EPS, 1 - FIRING_EPS)
    wanted = torch.distributions.Bernoulli(probs=torch.full_like(rho, target), validate_args=False)
    actual = torch.distributions.Bernoulli(probs=rho, validate_args=False)
    return torch.distributions.kl_divergence(wanted, actual).sum()


def encoder_jacobian(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes ``encode(x)`` and ||J_f(x)||_F^2, the squared Frobenius norm of the encoder's
    Jacobian dz/dx at each image, batch-averaged: the contractive autoencoder's penalty
    (Rifai et al. 2011, "Contractive auto-encoders", eq. 2).

    Exact, for any encoder: ``torch.func.jacrev`` per image, ``vmap``-ed over the batch, with
    the code as auxiliary output so the encoder runs forward once. Gradients reach the
    encoder's parameters through it (``loss.backward()`` differentiates the Jacobian).
    ``randomness="different"``: dropout draws its own mask per image, as in a plain batch.
    """

    def one(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = encode(image.unsqueeze(0)).squeeze(0)
        return code, code

    jacobians, codes = torch.func.vmap(
        torch.func.jacrev(one, has_aux=True), randomness="different"
    )(x)  # (B, z, *image), (B, z)
    return codes, jacobians.square().flatten(1).sum(dim=1).mean()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` squared Euclidean distances of the rows of ``a`` and ``b``, by differences:
    exact at 0, where ``torch.cdist``'s square root has no gradient."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).square().sum(dim=-1)


IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def imq_mmd(
    codes: torch.Tensor,
    prior: torch.Tensor,
    variance: float = 1.0,
    scales: Sequence[float] = IMQ_SCALES,
) -> torch.Tensor:
    """The unbiased estimate of MMD^2 between ``codes`` and ``prior`` draws (both ``(n, z)``)
    under the inverse multiquadratic kernel k(a, b) = C / (C + ||a - b||^2), summed over
    C = 2 * z * ``variance`` * s for each scale s: WAE-MMD's penalty (Tolstikhin et al. 2018,
    "Wasserstein auto-encoders", Algorithm 2 and section 4, against a N(0, variance I) prior).

    Within-set pairs exclude i = j (divided by n(n - 1)); cross pairs are all n^2.
    """
    n = codes.shape[0]
    if n < 2 or prior.shape != codes.shape:
        raise ValueError(f"MMD needs two sets of >= 2 codes of one shape: {n} and {prior.shape}")
    base = 2.0 * codes.shape[1] * variance
    within = squared_distances(codes, codes), squared_distances(prior, prior)
    across = squared_distances(codes, prior)
    off_diagonal = 1.0 - torch.eye(n, dtype=codes.dtype, device=codes.device)
    total = codes.new_zeros(())
    for scale in scales:
        c = base * scale
        same = sum(((c / (c + d)) * off_diagonal).sum() for d in within) / (n * (n - 1))
        total = total + same - 2.0 * (c / (c + across)).sum() / (n * n)
    return total


def squared_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum of squares of every entry of ``tensors``: ||theta||^2, RAE-L2's decoder penalty
    (Ghosh et al. 2020, "From variational to deterministic autoencoders", eq. 11)."""
    return torch.stack([t.square().sum() for t in tensors]).sum()


# --- log densities and bounds for the likelihood families (IWAE, VampPrior, the test NLL) ---


def log_likelihood(outputs: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """log p(x | z) per image, ``(...,)`` for outputs and pixels ``(..., 1, 28, 28)``.

    The normalised density, as ``reconstruction_nats`` (which is its batch-averaged negative):
    ``bernoulli`` reads logits, ``gaussian`` is N(x; outputs, 1/2) per pixel with its
    constant ``-log(pi)/2``, so an importance-sampled estimate of log p(x) is in nats.
    """
    if likelihood == "bernoulli":
        per_pixel = -F.binary_cross_entropy_with_logits(
            outputs, x.expand_as(outputs), reduction="none"
        )
    elif likelihood == "gaussian":
        per_pixel = -(outputs - x).square() - 0.5 * math.log(math.pi)
    else:
        raise ValueError(f"Unknown likelihood {likelihood!r}: choose one of {list(LIKELIHOODS)}.")
    return per_pixel.flatten(-3).sum(dim=-1)


def diagonal_gaussian(mean: torch.Tensor, log_var: torch.Tensor) -> Independent:
    """N(mean, diag(exp(log_var))) over the last dimension, as a torch distribution.

    Argument checks are off: they read values back to the host, which a captured CUDA graph
    cannot do (and the encoder's outputs are valid by construction).
    """
    scale = torch.exp(0.5 * log_var)
    return Independent(Normal(mean, scale, validate_args=False), 1, validate_args=False)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.square() + math.log(2 * math.pi)).sum(dim=-1)


def mixture_log_density(
    z: torch.Tensor, means: torch.Tensor, log_vars: torch.Tensor
) -> torch.Tensor:
    """log p(z) of the equal-weight mixture of N(means[k], diag(exp(log_vars[k]))), ``(...,)``.

    The VampPrior (Tomczak & Welling 2018, eq. 9): ``means``/``log_vars`` ``(K, z)`` are the
    encoder's posteriors at the K pseudo-inputs, p(z) = 1/K sum_k q(z | u_k).
    """
    weights = Categorical(logits=torch.zeros_like(means[:, 0]), validate_args=False)
    mixture = MixtureSameFamily(weights, diagonal_gaussian(means, log_vars), validate_args=False)
    return mixture.log_prob(z)


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """L_k = log (1/k sum_i w_i) per image from log weights ``(B, k)`` (Burda et al. 2016, eq. 8).

    log w_i = log p(x, z_i) - log q(z_i | x) with z_i ~ q(z | x); k = 1 is the ELBO, and
    L_k rises towards log p(x) as k grows. ``logsumexp`` keeps it exact when the weights
    underflow.
    """
    return torch.logsumexp(log_weights, dim=1) - math.log(log_weights.shape[1])


def vector_quantise(
    z: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codebook entries of ``z`` ``(B, G * d)`` split into G groups of d dimensions.

    ``codebooks`` is ``(G, C, d)``: group g is quantised against its own C entries. Returns
    ``(quantised (B, G * d), indices (B, G), distances (B, G, C))``. Van den Oord et al.
    2017, eq. 1; ``straight_through`` and ``vq_losses`` give the gradient and the loss.
    """
    groups, _, width = codebooks.shape
    parts = z.view(z.shape[0], groups, width).transpose(0, 1)  # (G, B, d)
    # ||z||^2 - 2 z.e + ||e||^2 as matrix products: what cdist computes, but ONNX can export it.
    distances = (
        parts.square().sum(-1, keepdim=True)
        - 2 * parts @ codebooks.transpose(1, 2)
        + codebooks.square().sum(-1).unsqueeze(1)
    ).transpose(0, 1)  # (B, G, C)
    indices = distances.argmin(dim=2)  # (B, G)
    quantised = torch.gather(
        codebooks.unsqueeze(0).expand(z.shape[0], -1, -1, -1),
        2,
        indices[:, :, None, None].expand(-1, -1, 1, width),
    ).view_as(z)
    return quantised, indices, distances


def straight_through(z: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """The quantised values forward, the identity backward: the decoder input's gradient
    reaches the encoder output unchanged (van den Oord et al. 2017, section 3.2)."""
    return z + (quantised - z).detach()


def vq_losses(z: torch.Tensor, quantised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, commitment)`` terms of van den Oord et al. 2017, eq. 3, batch-averaged.

    codebook = ||sg[z] - e||^2 moves the entries towards the codes; commitment =
    ||z - sg[e]||^2 (weighted by beta in the loss) keeps the encoder near its entries.
    Squared distances are summed over the code's dimensions.
    """
    codebook = (z.detach() - quantised).square().sum(dim=1).mean()
    commitment = (z - quantised.detach()).square().sum(dim=1).mean()
    return codebook, commitment
