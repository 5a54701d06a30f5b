r"""The article's notation for the noise schedule, on diffusers' ``DDPMScheduler``.

Notation of Su, *生成扩散模型漫谈(一): DDPM = 拆楼 + 建楼*, https://kexue.fm/archives/9119 (2022). Demolishing (the
forward process) is :math:`x_t = \alpha_t x_{t-1} + \beta_t\varepsilon_t` with :math:`\alpha_t^2 + \beta_t^2 = 1`; with
:math:`\bar\alpha_t = \alpha_1\cdots\alpha_t` and :math:`\bar\beta_t = \sqrt{1-\bar\alpha_t^2}` it collapses to

.. math::  x_t = \bar\alpha_t x_0 + \bar\beta_t\bar\varepsilon, \qquad \bar\varepsilon\sim\mathcal N(0, I).

Building (training) minimises :math:`\|\varepsilon - \epsilon_\theta(\bar\alpha_t x_0 + \bar\beta_t\varepsilon, t)\|^2`
(the article's :math:`\frac{\bar\beta_t}{\beta_t}\epsilon_\theta` is diffusers' :math:`\epsilon_\theta`), and sampling
runs :math:`x_{t-1} = \frac1{\alpha_t}\bigl(x_t - \frac{\beta_t^2}{\bar\beta_t}\epsilon_\theta(x_t, t)\bigr) +
\sigma_t z`. diffusers writes the same quantities as ``betas`` :math:`=\beta_t^2`, ``alphas`` :math:`=\alpha_t^2` and
``alphas_cumprod`` :math:`=\bar\alpha_t^2` (see :func:`article_coefficients`). The article's schedule
:math:`\alpha_t = \sqrt{1 - 0.02\,t/T}` is ``beta_schedule="article"``: diffusers' linear betas from :math:`0.02/T` to
:math:`0.02`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers import DDPMScheduler
from torch import Tensor

__all__ = ["ArticleCoefficients", "article_alphas", "article_coefficients", "make_noise_scheduler"]

_SCHEDULES = ("article", "linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def article_alphas(num_train_timesteps: int = 1000) -> Tensor:
    r"""The article's schedule :math:`\alpha_t = \sqrt{1 - 0.02\,t/T}`, :math:`t = 1..T` (float64)."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64)
    return torch.sqrt(1 - 0.02 * t / num_train_timesteps)


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    **kwargs: Any,
) -> DDPMScheduler:
    r"""A ``DDPMScheduler``; ``beta_schedule="article"`` gives :math:`\alpha_t=\sqrt{1-0.02t/T}`, i.e. the paper's
    :math:`\beta^{\text{paper}}_t = 1-\alpha_t^2 = 0.02t/T`: linear betas from ``0.02/T`` to ``0.02``.

    Extra keyword arguments go to ``DDPMScheduler`` (``clip_sample``, ``variance_type``, ...).
    """
    if beta_schedule not in _SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {_SCHEDULES}, got {beta_schedule!r}.")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction_type!r}.")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}.")
    if beta_schedule == "article":
        kwargs = {"beta_start": 0.02 / num_train_timesteps, "beta_end": 0.02, **kwargs}
        beta_schedule = "linear"
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        **kwargs,
    )


class ArticleCoefficients(NamedTuple):
    r"""The article's :math:`\alpha_t, \beta_t, \bar\alpha_t, \bar\beta_t` for :math:`t = 1..T` (index ``t-1``)."""

    alpha: Tensor
    beta: Tensor
    alpha_bar: Tensor
    beta_bar: Tensor


def article_coefficients(scheduler: DDPMScheduler) -> ArticleCoefficients:
    r"""Translate a diffusers scheduler into the article's notation (float64).

    :math:`\alpha_t = \sqrt{1-\beta^{\text{paper}}_t}`, :math:`\beta_t = \sqrt{\beta^{\text{paper}}_t}`,
    :math:`\bar\alpha_t = \alpha_1\cdots\alpha_t = \sqrt{\bar\alpha^{\text{paper}}_t}`,
    :math:`\bar\beta_t = \sqrt{1-\bar\alpha_t^2}` (the products in float64, from the scheduler's betas).
    """
    betas = scheduler.betas.double()
    alpha = torch.sqrt(1 - betas)
    alpha_bar = torch.cumprod(alpha, 0)  # in float64: the scheduler's float32 cumprod loses 1 - alpha_bar at small t
    return ArticleCoefficients(alpha, torch.sqrt(betas), alpha_bar, torch.sqrt(1 - alpha_bar**2))
