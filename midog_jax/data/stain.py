"""Stain colour maths: colour deconvolution, HED jitter, Macenko, Reinhard, RandStainNA.

Pure functions. The per-pixel ones take `xp`, the array module: jax.numpy (the
default) inside the jitted augmentation, NumPy on the host. The estimates run
once per case in NumPy on a low-resolution sample of the ROI.

* Colour deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001):
  optical density OD = -ln(rgb), rgb in 0..1, and HED = OD @ inverse of the
  unit stain vectors (haematoxylin, eosin, DAB), so OD = HED @ stains.
* HED jitter (Tellez et al., IEEE TMI 2018): each HED channel s -> a s + b,
  a ~ U[1 - sigma, 1 + sigma], b ~ U[-sigma, sigma]; "light" sigma 0.05,
  "strong" 0.2. b is in OD units (skimage's `rgb2hed`, which many
  reimplementations use, divides OD by ln 10^6, so the same sigma there
  shifts 13.8 times as far).
* Macenko (ISBI 2009): the plane of the two main directions of tissue OD,
  the stains at the 1st and 99th percentile angles in it, concentrations by
  least squares, normalised by their 99th percentile. Normalising a case to a
  target is then one affine map of OD, `macenko_params`. Two choices differ
  from common implementations: tissue is OD of norm above 0.15 (not every
  channel above it, which drops pale eosin, whose red OD is small), and the
  OD the two stains do not explain is kept rather than dropped.
* Reinhard (IEEE CG&A 2001): per-channel mean and std in CIE L*a*b* moved to a
  target's. RandStainNA (Shen et al., MICCAI 2022): the same with a target
  drawn per image from the distribution of the training cases' statistics,
  in L*a*b* or HSV.

A case's normalisation is a [4, 3] float array ("params"): for Macenko the
OD map (rows 0-2) and offset (row 3); for Reinhard the source mean and std
and the target mean and std (rows 0-3). The same params drive the device
(crops) and the host (whole images for detection).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from midog_jax.data import normalization

NORMALIZATIONS = ("none", "macenko", "reinhard")
SPACES = ("none", "lab", "hsv")  # RandStainNA's colour spaces; "none": off.
HED_LIGHT, HED_STRONG = 0.05, 0.2  # Tellez et al. 2018.
EPS = 1e-6  # Darkest value in deconvolution: OD at most -ln(EPS) = 13.8.
VERSION = 1  # Of the per-case estimates (`case_statistics`).
# Macenko's defaults: OD norm of transparent pixels, angle percentile.
_BETA, _ALPHA = 0.15, 1.0
_MIN_STAIN_PIXELS = 200  # Fewer tissue pixels: no estimate, the case is left as it is.
_MAX_SAMPLE = 1 << 18  # Pixels of the low-resolution sample an estimate uses.


def check_switches(method: str, space: str, sigma: float) -> tuple[str, str, float]:
  """The config's stain switches, or a ValueError naming the field and its choices."""
  if method not in NORMALIZATIONS:
    raise ValueError(f"stain_normalization {method!r}: expected one of {NORMALIZATIONS}")
  if space not in SPACES:
    raise ValueError(f"augment.randstainna {space!r}: expected one of {SPACES}")
  if not float(sigma) >= 0:  # Also false for NaN.
    raise ValueError(f"augment.randstainna_sigma {sigma}: expected a number >= 0")
  return method, space, float(sigma)


def _unit_rows(m: np.ndarray) -> np.ndarray:
  return m / np.linalg.norm(m, axis=1, keepdims=True)


# Ruifrok & Johnston's OD vectors: rows haematoxylin, eosin, DAB.
RGB_FROM_HED = _unit_rows(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11],
                                    [0.27, 0.57, 0.78]])).astype(np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED.astype(np.float64)).astype(np.float32)
IDENTITY = np.vstack([np.eye(3), np.zeros((1, 3))]).astype(np.float32)  # Macenko params.
# sRGB (D65) to CIE XYZ, and the D65 white point.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float32)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB.astype(np.float64)).astype(np.float32)
_D65 = np.array([0.950456, 1.0, 1.088754], np.float32)


def _mix(x, m, xp=jnp):
  """x [..., 3] times a 3x3 matrix, as sums of products: full float32 on any
  device (no reduced-precision matmul path)."""
  m = xp.asarray(m, dtype=x.dtype)
  return x[..., 0:1] * m[0] + x[..., 1:2] * m[1] + x[..., 2:3] * m[2]


# ------------------------------------------------------------- deconvolution


def rgb_to_od(x, xp=jnp):
  """Optical density of rgb in 0..1 (clipped at EPS)."""
  return -xp.log(xp.maximum(x, EPS))


def rgb_to_hed(x, xp=jnp):
  """Stain amounts (H, E, DAB) in OD units of rgb in 0..1."""
  return _mix(rgb_to_od(x, xp), HED_FROM_RGB, xp)


def hed_to_rgb(hed, xp=jnp):
  """rgb of stain amounts; the inverse of `rgb_to_hed` (rgb >= EPS)."""
  return xp.exp(-_mix(hed, RGB_FROM_HED, xp))


def hed_jitter(key: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
  """Tellez's HED jitter of one image in 0..1; sigma 0 is the identity."""
  if sigma == 0:
    return x
  ka, kb = jax.random.split(key)
  a = jax.random.uniform(ka, (3,), jnp.float32, 1.0 - sigma, 1.0 + sigma)
  b = jax.random.uniform(kb, (3,), jnp.float32, -sigma, sigma)
  return jnp.clip(hed_to_rgb(rgb_to_hed(x) * a + b), 0.0, 1.0)


# ------------------------------------------------------------- colour spaces


def rgb_to_lab(x, xp=jnp):
  """CIE L*a*b* (D65) of sRGB in 0..1."""
  x = xp.clip(x, 0.0, 1.0)
  linear = xp.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
  xyz = _mix(linear, _XYZ_FROM_RGB.T, xp) / xp.asarray(_D65, dtype=x.dtype)
  d = 6.0 / 29.0
  f = xp.where(xyz > d ** 3, xp.cbrt(xp.maximum(xyz, 0.0)), xyz / (3 * d * d) + 4.0 / 29.0)
  return xp.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                   200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab, xp=jnp):
  """sRGB in 0..1 (clipped) of CIE L*a*b* (D65); the inverse of `rgb_to_lab`."""
  fy = (lab[..., 0] + 16.0) / 116.0
  f = xp.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
  d = 6.0 / 29.0
  xyz = xp.where(f > d, f ** 3, 3 * d * d * (f - 4.0 / 29.0)) * xp.asarray(_D65, dtype=lab.dtype)
  linear = xp.clip(_mix(xyz, _RGB_FROM_XYZ.T, xp), 0.0, 1.0)
  return xp.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)


def rgb_to_hsv(x, xp=jnp):
  """HSV, each in 0..1 (hue in turns), of rgb in 0..1."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = xp.maximum(xp.maximum(r, g), b)
  c = v - xp.minimum(xp.minimum(r, g), b)
  safe = xp.where(c > 0, c, 1.0)
  h = xp.where(v == r, xp.mod((g - b) / safe, 6.0),
               xp.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h = xp.where(c > 0, h / 6.0, 0.0)
  s = xp.where(v > 0, c / xp.where(v > 0, v, 1.0), 0.0)
  return xp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv, xp=jnp):
  """rgb in 0..1 of HSV (hue wrapped, saturation and value clipped)."""
  h = xp.mod(hsv[..., 0], 1.0) * 6.0
  s, v = xp.clip(hsv[..., 1], 0.0, 1.0), xp.clip(hsv[..., 2], 0.0, 1.0)
  i = xp.floor(h)
  f = h - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = xp.mod(i, 6.0)
  pick = lambda *vals: xp.select([i == k for k in range(6)], vals)
  return xp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p),
                   pick(p, p, t, v, v, q)], axis=-1)


_TO_SPACE = {"lab": rgb_to_lab, "hsv": rgb_to_hsv}
_FROM_SPACE = {"lab": lab_to_rgb, "hsv": hsv_to_rgb}


def tissue(x, xp=jnp):
  """The tissue mask of `normalization.tissue_mask` for rgb in 0..1."""
  chroma = x.max(axis=-1) - x.min(axis=-1)
  # Half a level of slack: interpolated pixels sit between the integer levels.
  return ((chroma >= (normalization.MIN_CHROMA - 0.5) / 255.0)
          | (x.mean(axis=-1) < normalization.MAX_GREY / 255.0))


def masked_stats(values, mask, xp=jnp):
  """Per-channel mean and std of values [..., 3] where `mask`; all pixels
  when the mask is empty."""
  v = values.reshape(-1, 3)
  w = mask.reshape(-1).astype(v.dtype)
  w = xp.where(w.sum() > 0, w, xp.ones_like(w))
  n = w.sum()
  mean = (v * w[:, None]).sum(0) / n
  var = (((v - mean) ** 2) * w[:, None]).sum(0) / n
  return mean, xp.sqrt(xp.maximum(var, 0.0))


def _reinhard(x, src_mean, src_std, tgt_mean, tgt_std, space: str, xp=jnp):
  """Channel statistics in `space` moved from (src_mean, src_std) to the target's."""
  c = _TO_SPACE[space](x, xp)
  c = (c - src_mean) / xp.maximum(src_std, 1e-3) * tgt_std + tgt_mean
  return xp.clip(_FROM_SPACE[space](c, xp), 0.0, 1.0)


def randstainna(key: jax.Array, x: jax.Array, distribution: jax.Array, space: str,
                sigma: float = 1.0) -> jax.Array:
  """RandStainNA of one image in 0..1: Reinhard to a template drawn per image.

  `distribution` [4, 3]: the mean and std over training cases of their
  per-channel means (rows 0, 1) and of their per-channel stds (rows 2, 3);
  `sigma` scales the spread drawn from (0: always the mean template).
  """
  ka, kb = jax.random.split(key)
  d = distribution.astype(jnp.float32)
  tgt_mean = d[0] + sigma * d[1] * jax.random.normal(ka, (3,))
  tgt_std = jnp.maximum(d[2] + sigma * d[3] * jax.random.normal(kb, (3,)), 1e-3)
  mean, std = masked_stats(_TO_SPACE[space](x), tissue(x))
  return _reinhard(x, mean, std, tgt_mean, tgt_std, space)


# ------------------------------------------------------------- case params


def apply(x, params, method: str, xp=jnp):
  """A case's stain normalisation (`method`, its [4, 3] params) of rgb in 0..1."""
  if method == "macenko":
    od = -xp.log((x * 255.0 + 1.0) / 256.0)  # The +1 keeps black finite.
    od = _mix(od, params[:3], xp) + params[3]
    return xp.clip((256.0 * xp.exp(-od) - 1.0) / 255.0, 0.0, 1.0)
  if method == "reinhard":
    return _reinhard(x, params[0], params[1], params[2], params[3], "lab", xp)
  raise ValueError(f"stain_normalization {method!r}: expected one of {NORMALIZATIONS[1:]}")


def normalize_image(rgb: np.ndarray, params: np.ndarray, method: str,
                    rows: int = 1024) -> np.ndarray:
  """A whole uint8 image normalised on the default device, `rows` rows at a time
  (the last block padded: one compilation per image width, and per height
  below `rows`)."""
  h = rgb.shape[0]
  rows = min(rows, h)
  params = jnp.asarray(params, jnp.float32)
  out = np.empty_like(rgb)
  for y in range(0, h, rows):
    block = np.asarray(rgb[y:y + rows])
    n = len(block)
    if n < rows:
      block = np.pad(block, ((0, rows - n), (0, 0), (0, 0)))
    out[y:y + n] = np.asarray(_normalize_rows(block, params, method))[:n]
  return out


@functools.partial(jax.jit, static_argnames="method")
def _normalize_rows(block: jax.Array, params: jax.Array, method: str) -> jax.Array:
  x = block.astype(jnp.float32) / 255.0
  return jnp.round(apply(x, params, method) * 255.0).astype(jnp.uint8)


def _sample(rgb: np.ndarray) -> np.ndarray:
  """At most _MAX_SAMPLE pixels of the image on a regular grid, [N, 3] uint8."""
  h, w = rgb.shape[:2]
  stride = max(1, math.ceil(math.sqrt(h * w / _MAX_SAMPLE)))
  return np.asarray(rgb[::stride, ::stride]).reshape(-1, 3)


def macenko_estimate(pixels: np.ndarray) -> dict[str, list] | None:
  """Macenko's stains (unit OD rows H, E) and 99th-percentile concentrations
  of uint8 pixels [N, 3]; None with too little stained tissue."""
  od = -np.log((pixels.astype(np.float64) + 1.0) / 256.0)
  stained = od[np.linalg.norm(od, axis=1) > _BETA]
  if len(stained) < _MIN_STAIN_PIXELS:
    return None
  _, vectors = np.linalg.eigh(np.cov(stained.T))
  plane = vectors[:, [2, 1]]  # The two largest directions.
  plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # Point into positive OD.
  proj = stained @ plane
  phi = np.arctan2(proj[:, 1], proj[:, 0])
  ends = [plane @ np.array([np.cos(a), np.sin(a)])
          for a in np.percentile(phi, [_ALPHA, 100 - _ALPHA])]
  # Haematoxylin absorbs more red than eosin does.
  h, e = sorted(ends, key=lambda v: -v[0] / np.linalg.norm(v))
  stains = _unit_rows(np.abs(np.stack([h, e])))
  conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
  max_conc = np.maximum(np.percentile(conc, 99, axis=1), 1e-3)
  return {"stains": stains.tolist(), "max_conc": max_conc.tolist()}


def case_statistics(rgb: np.ndarray) -> dict[str, Any]:
  """Everything the stain switches need of one case, from a low-resolution sample:
  Macenko's estimate and the tissue's L*a*b* and HSV statistics."""
  pixels = _sample(rgb)
  mask = normalization.tissue_mask(pixels)
  x = pixels.astype(np.float32) / 255.0
  out: dict[str, Any] = {"version": VERSION, "macenko": macenko_estimate(pixels),
                         "tissue_pixels": int(mask.sum())}
  for space, to_space in _TO_SPACE.items():
    mean, std = masked_stats(to_space(x, np), mask, np)
    out[space] = {"mean": mean.tolist(), "std": std.tolist()}
  return out


def macenko_params(source: dict | None, target: dict) -> np.ndarray:
  """[4, 3] OD map of a case's estimate to the target's: concentrations by
  least squares on the source stains, scaled by the ratio of 99th
  percentiles, recomposed with the target stains. The OD the two stains do
  not explain (glass tint, noise) is kept as it is, where Macenko drops it:
  a case normalised to its own estimate is unchanged. No estimate: identity."""
  if source is None:
    return IDENTITY.copy()
  stains = np.asarray(source["stains"], np.float64)
  pinv = np.linalg.pinv(stains)  # [3, 2]: OD -> concentrations.
  scale = np.asarray(target["max_conc"]) / np.asarray(source["max_conc"])
  residual = np.eye(3) - pinv @ stains  # Keeps what lies off the stains' plane.
  m = residual + pinv @ np.diag(scale) @ np.asarray(target["stains"], np.float64)
  return np.vstack([m, np.zeros((1, 3))]).astype(np.float32)


def reinhard_params(source: dict, target: dict) -> np.ndarray:
  """[4, 3]: the case's L*a*b* mean and std, then the target's."""
  return np.asarray([source["mean"], source["std"], target["mean"], target["std"]],
                    np.float32)


# ------------------------------------------------------------- a run's stain


@dataclasses.dataclass(frozen=True)
class RunStain:
  """A run's stain switches and what it learnt of its training cases (stain.json).

  `target`: the normalisation's target (Macenko: stains and max_conc, the
  medians over training cases; Reinhard: L*a*b* mean and std, their means).
  `distribution`: RandStainNA's [4, 3] statistics in `space`.
  """
  normalization: str = "none"
  target: Any = None
  space: str = "none"
  distribution: tuple[tuple[float, float, float], ...] | None = None

  @classmethod
  def fit(cls, normalization_method: str, space: str, cases: Sequence[dict]) -> "RunStain":
    """From the training cases' `case_statistics`."""
    if not cases:
      raise ValueError("no training case to compute the stain statistics from")
    target, distribution = None, None
    if normalization_method == "macenko":
      found = [c["macenko"] for c in cases if c["macenko"] is not None]
      if not found:
        raise ValueError("Macenko found no stained tissue in any training case (every "
                         "case has fewer than 200 stained pixels); use another "
                         "stain_normalization")
      stains = _unit_rows(np.median([f["stains"] for f in found], axis=0))
      target = {"stains": stains.tolist(),
                "max_conc": np.median([f["max_conc"] for f in found], axis=0).tolist()}
    elif normalization_method == "reinhard":
      target = {k: np.mean([c["lab"][k] for c in cases], axis=0).tolist()
                for k in ("mean", "std")}
    if space != "none":
      means = np.array([c[space]["mean"] for c in cases])
      stds = np.array([c[space]["std"] for c in cases])
      distribution = tuple(tuple(float(v) for v in row) for row in (
          means.mean(0), means.std(0), stds.mean(0), stds.std(0)))
    return cls(normalization_method, target, space, distribution)

  def case_params(self, statistics: dict) -> np.ndarray:
    """The [4, 3] params that normalise a case with these statistics."""
    if self.normalization == "macenko":
      return macenko_params(statistics["macenko"], self.target)
    return reinhard_params(statistics["lab"], self.target)

  def image_params(self, rgb: np.ndarray) -> np.ndarray | None:
    """The params of an image estimated from its pixels: a whole ROI, or a whole
    slide's low-resolution level (then applied to each tile). None: no normalisation."""
    if self.normalization == "none":
      return None
    return self.case_params(case_statistics(rgb))

  def normalize(self, rgb: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """A uint8 image normalised as training normalised its case's crops, with
    `params` (default: estimated from `rgb` itself)."""
    if self.normalization == "none":
      return rgb
    params = self.image_params(rgb) if params is None else params
    return normalize_image(rgb, params, self.normalization)

  def to_json(self) -> dict[str, Any]:
    return {"normalization": self.normalization, "target": self.target,
            "randstainna": None if self.space == "none" else {
                "space": self.space, "distribution": [list(r) for r in self.distribution]}}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "RunStain":
    r = d.get("randstainna")
    return cls(d["normalization"], d.get("target"), r["space"] if r else "none",
               tuple(tuple(float(v) for v in row) for row in r["distribution"]) if r else None)
