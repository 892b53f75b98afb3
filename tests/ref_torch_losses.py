"""PyTorch references for the distillation losses and the official LR degradation.

Written for the tests from the facts in shared/reference/askd_facts.md (NCHW, the torch
functional API the official code paths use); not copied from any repository. Importing
this module needs torch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


# --- A-SKD: sum over maps of mean_b (1 - cos), times the weight -------------------------------
def askd(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
         weight: float = 5.0) -> torch.Tensor:
  total = torch.zeros(())
  for s, t in zip(student_maps, teacher_maps):
    s = s.reshape(s.shape[0], -1)
    t = t.reshape(t.shape[0], -1).detach()
    total = total + weight * torch.mean(1.0 - F.cosine_similarity(s, t))
  return total


# --- AT: stage features NCHW -------------------------------------------------------------------
def at_map(x: torch.Tensor) -> torch.Tensor:
  return F.normalize(x.pow(2).mean(1).reshape(x.shape[0], -1))


def at(student_stages, teacher_stages, beta: float = 1e3) -> torch.Tensor:
  terms = [(at_map(s) - at_map(t.detach())).pow(2).mean()
           for s, t in zip(student_stages, teacher_stages)]
  return beta * sum(terms)


# --- F-KD ---------------------------------------------------------------------------------------
def fkd(s: torch.Tensor, t: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
  return weight * F.mse_loss(s, t.detach())


# --- RKD distance and angle (Park et al. 2019) ---------------------------------------------------
def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  sq = e.pow(2).sum(1)
  d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
  n = e.shape[0]
  d[range(n), range(n)] = 0
  return d


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    td = _pdist(t)
    td = td / td[td > 0].mean()
  sd = _pdist(s)
  sd = sd / sd[sd > 0].mean()
  return F.smooth_l1_loss(sd, td)


def _angles(e: torch.Tensor) -> torch.Tensor:
  diff = e.unsqueeze(0) - e.unsqueeze(1)  # [j, i] = e_i - e_j
  unit = F.normalize(diff, p=2, dim=2)
  return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    ta = _angles(t)
  return F.smooth_l1_loss(_angles(s), ta)


# --- official degradation ------------------------------------------------------------------------
def _gauss1d(sigma: float, size: int = 5) -> torch.Tensor:
  half = (size - 1) * 0.5
  x = torch.linspace(-half, half, steps=size)
  pdf = torch.exp(-0.5 * (x / sigma).pow(2))
  return pdf / pdf.sum()


def gaussian_blur(img: torch.Tensor, sigma=(0.1, 2.0), size: int = 5) -> torch.Tensor:
  """torchvision semantics: sigma = (sigma_x along width, sigma_y along height); NCHW."""
  kx = _gauss1d(sigma[0], size)
  ky = _gauss1d(sigma[1], size)
  k2d = ky[:, None] @ kx[None, :]  # rows (height) use sigma_y
  c = img.shape[1]
  k = k2d.expand(c, 1, size, size)
  p = size // 2
  img = F.pad(img, [p, p, p, p], mode="reflect")
  return F.conv2d(img, k, groups=c)


def degrade_official(img_nchw: torch.Tensor, size: int) -> torch.Tensor:
  full = img_nchw.shape[-1]
  x = F.interpolate(img_nchw, size=int(size))  # mode='nearest' is the default
  x = F.interpolate(x, size=full)
  return gaussian_blur(x, (0.1, 2.0))
