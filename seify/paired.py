"""The paired tests ``seify compare`` makes: two arms' models judged on the same images, the image as the unit."""
from __future__ import annotations

import math
from collections import Counter

import numpy


def mcnemar(only_first: int, only_second: int) -> float:
    """McNemar's exact test: the two-sided p-value that two models are equally often right, from the images only
    the first got right and those only the second did (a binomial test of the discordant pairs at one half)."""
    n, k = only_first + only_second, min(only_first, only_second)
    tail, term = 0, 1  # sum of C(n, i) for i <= k, each term from the last: exact integers, linear in k
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2 ** n)


def per_image_test(differences: list[int]) -> float:
    """The exact two-sided p-value that, image by image, neither arm is right more often: a sign-flip
    (randomisation) test of the per-image differences in correct counts over seeds, the image being the unit.

    Under the null hypothesis each image's difference is as likely to have either sign, whatever its size, so the
    statistic (their sum) is distributed as a sum of independent +-|d| over the images with d != 0; that
    distribution is computed exactly up to float rounding (a product of binomials, by FFT). With one seed it is
    McNemar's exact test."""
    sizes = Counter(abs(d) for d in differences if d)
    if not sizes:
        return 1.0
    total = sum(size * n for size, n in sizes.items())  # W = sum of size x (images of that size with d > 0)
    length = 1 << (total + 1).bit_length()
    spectrum = numpy.ones(length // 2 + 1, dtype=complex)
    for size, n in sizes.items():
        pmf = numpy.zeros(length)
        pmf[: size * n + 1: size] = _binomial_half(n)
        spectrum *= numpy.fft.rfft(pmf)
    distribution = numpy.clip(numpy.fft.irfft(spectrum, length)[: total + 1], 0.0, None)
    observed = abs(sum(differences))
    extreme = numpy.abs(2 * numpy.arange(total + 1) - total) >= observed - 1e-9
    return float(min(1.0, distribution[extreme].sum()))


def _binomial_half(n: int) -> numpy.ndarray:
    k = numpy.arange(n + 1)
    log_pmf = numpy.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k]) - \
        n * math.log(2)
    return numpy.exp(log_pmf)
