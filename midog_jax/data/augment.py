"""Training augmentation on the accelerator, following fastai v1.

The reference trained with fastai v1's `get_transforms(flip_vert=True,
max_rotate=10, max_zoom=2, max_lighting=0.5, max_warp=0.2, p_affine=0.5,
p_lighting=0.5)`. This module reproduces those transforms as pure JAX so they
run inside the jitted train step:

* Geometry. fastai applies the coordinate transform (`symmetric_warp`) to the
  identity grid first and then the affine matrix `dihedral @ rotate @ zoom`,
  so an output position g samples the input at `D R Z H(g)`, in coordinates
  normalised to [-1, 1] over the patch, (x, y) order, y down. Because the
  affine part has last row (0, 0, 1), the whole map is one 3x3 homography
  T = D R Z H and the image needs a single bilinear gather.
* Boxes. As fastai's `ImageBBox`: the four corners of each box go through the
  inverse map T^-1 (fastai inverts the affine part and runs the warps with
  `invert=True`), the axis-aligned bounding box of the corners is clipped to
  the patch, and a box with zero width or height is dropped
  (`_compute_boxes`). Slots are never reordered, so host-side labels stay
  aligned with the output.
* Lighting. `brightness` adds `logit(change)` and then `contrast` multiplies
  by `scale` in logit space of the 0..1 image, after the resampling, as
  fastai's `Image.lighting` does; change ~ U[0.25, 0.75], scale ~
  log-U[0.5, 2].
* Each of warp, rotate, zoom fires independently with p_affine; brightness
  and contrast independently with p_lighting; the dihedral element is always
  drawn, uniformly from 8.

Stain switches (off by default, as in the reference; `stain.py` holds the
maths): a case's stain normalisation (Macenko or Reinhard, per-image params
from the host) right after the resampling, then RandStainNA (a Reinhard
transform to a template drawn from the run's training statistics), then
lighting, then the COLOUR_AUGMENTATIONS a run names (HED jitter: "hed_light",
"hed_strong"). Validation patches get the stain normalisation only.

Deliberate differences from fastai: the input is a crop larger than the patch
(see `margin`), so rotation and warp show real tissue where fastai reflected
the patch, and objects rotated in from outside the patch get boxes; sampling
that still leaves the crop is reflected about its border (half-sample
symmetric, like `grid_sample(padding_mode='reflection',
align_corners=False)`). Pixel centres sit at i + 0.5 for both image and boxes,
so they agree exactly; fastai's image grid (`linspace(-1, 1, P)` fed to
`grid_sample`) and its box scaling (`x / (P / 2) - 1`) differ by up to half a
pixel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.typing import DTypeLike

from midog_jax.data import stain as stain_lib


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The reference's fastai v1 transform settings."""
  enabled: bool = True  # False: centre patch and normalisation only.
  dihedral: bool = True  # One of the 8 flips/rotations by 90°, always.
  max_warp: float = 0.2  # symmetric_warp magnitude ~ U[-max, max] (x4).
  max_rotate: float = 10.0  # Degrees ~ U[-max, max].
  max_zoom: float = 2.0  # Scale ~ U[1, max], focus row/col ~ U[0, 1].
  p_affine: float = 0.5
  brightness: tuple[float, float] = (0.25, 0.75)  # change ~ U; 0.5 neutral.
  contrast: tuple[float, float] = (0.5, 2.0)  # scale ~ log-uniform.
  p_lighting: float = 0.5
  # Names in COLOUR_AUGMENTATIONS applied after lighting, in order; none in
  # the reference.
  colour: tuple[str, ...] = ()
  # RandStainNA's colour space ("lab", "hsv"; "none": off) and the scale of
  # the spread its templates are drawn with (1: the training cases' own).
  randstainna: str = "none"
  randstainna_sigma: float = 1.0
  # The per-image stain normalisation the batches' "stain" params are for.
  stain_normalization: str = "none"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, enabled: bool = True) -> "AugmentConfig":
    """The augmentation of a run's `config`; `enabled=False` for validation."""
    a = config.augment
    for name in a.get("colour", ()):
      colour_augmentation(name)  # An unknown name fails here, before any data is read.
    method, space, sigma = stain_lib.check_switches(config.get("stain_normalization", "none"),
                                                    a.get("randstainna", "none"),
                                                    a.get("randstainna_sigma", 1.0))
    return cls(enabled=enabled and a.enabled, max_warp=a.max_warp, max_rotate=a.max_rotate,
               max_zoom=a.max_zoom, p_affine=a.p_affine, brightness=tuple(a.brightness),
               contrast=tuple(a.contrast), p_lighting=a.p_lighting,
               colour=tuple(a.get("colour", ())), randstainna=space,
               randstainna_sigma=sigma, stain_normalization=method)


class AugmentParams(NamedTuple):
  """Random draws for one image; flags say which transforms fire."""
  k: jax.Array  # Dihedral element in [0, 8).
  warp: jax.Array  # [4] symmetric_warp magnitudes.
  angle: jax.Array  # Degrees.
  scale: jax.Array  # Zoom factor >= 1.
  row_pct: jax.Array
  col_pct: jax.Array
  change: jax.Array  # Brightness.
  contrast: jax.Array
  do_warp: jax.Array
  do_rotate: jax.Array
  do_zoom: jax.Array
  do_brightness: jax.Array
  do_contrast: jax.Array


def margin(patch_size: int) -> int:
  """Pixels of real tissue the host adds on each side of the patch.

  A window of side P * sqrt(2) (724 px for P = 512, the window the annotation
  statistics were measured on) holds the patch rotated by any angle. Zoom only
  shrinks the sampled area; warp 0.2 and 10° of rotation push the corners
  out: at P = 512, 99% of default draws sample no further than 104 px beyond
  the patch, inside the 106 px margin, and the rest (extreme warps, up to
  about 200 px) read a thin border reflected about the crop's edge.
  """
  return int(round(patch_size * (math.sqrt(2.0) - 1.0) / 2.0))


def crop_size(patch_size: int) -> int:
  """Side of the uint8 crop the host yields for a patch of `patch_size`."""
  return patch_size + 2 * margin(patch_size)


def sample_params(key: jax.Array, config: AugmentConfig) -> AugmentParams:
  """Draws one image's transform parameters as fastai's RandTransform does."""
  ks = jax.random.split(key, 13)
  u = lambda k, lo, hi, shape=(): jax.random.uniform(
      k, shape, jnp.float32, lo, hi)
  bern = lambda k, p: jax.random.uniform(k) < p
  lo_c, hi_c = config.contrast
  k = jax.random.randint(ks[0], (), 0, 8) if config.dihedral else jnp.int32(0)
  return AugmentParams(
      k=jnp.asarray(k, jnp.int32),
      warp=u(ks[1], -config.max_warp, config.max_warp, (4,)),
      angle=u(ks[2], -config.max_rotate, config.max_rotate),
      scale=u(ks[3], 1.0, config.max_zoom),
      row_pct=u(ks[4], 0.0, 1.0),
      col_pct=u(ks[5], 0.0, 1.0),
      change=u(ks[6], *config.brightness),
      contrast=jnp.exp(u(ks[7], math.log(lo_c), math.log(hi_c))),
      do_warp=bern(ks[8], config.p_affine) & (config.max_warp > 0),
      do_rotate=bern(ks[9], config.p_affine) & (config.max_rotate > 0),
      do_zoom=bern(ks[10], config.p_affine) & (config.max_zoom > 1),
      do_brightness=bern(ks[11], config.p_lighting),
      do_contrast=bern(ks[12], config.p_lighting),
  )


def identity_params() -> AugmentParams:
  """Parameters under which nothing fires (neutral values everywhere)."""
  f = jnp.float32
  no = jnp.bool_(False)
  return AugmentParams(
      jnp.int32(0), jnp.zeros(4, f), f(0), f(1), f(0.5), f(0.5), f(0.5),
      f(1), no, no, no, no, no)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32: TF32 matmuls on GPUs would move coordinates by ~0.1 px.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _inv3(m: jax.Array) -> jax.Array:
  """Inverse of a 3x3 matrix by its adjugate (no solver on the device)."""
  adj = jnp.stack([jnp.cross(m[1], m[2]), jnp.cross(m[2], m[0]),
                   jnp.cross(m[0], m[1])], axis=1)
  return adj / jnp.dot(m[0], adj[:, 0], precision=jax.lax.Precision.HIGHEST)


def _warp_homography(targ: jax.Array) -> jax.Array:
  """H mapping quad `targ` onto the corners of [-1, 1]^2.

  fastai solves the 8x8 system of `_find_coeffs`; this builds the same H in
  closed form (Heckbert's square-to-quad map, inverted).
  """
  # Corners in the order (0,0), (1,0), (1,1), (0,1) of the unit square.
  (x0, y0), (x1, y1), (x2, y2), (x3, y3) = targ[0], targ[2], targ[3], targ[1]
  dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
  dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
  det = dx1 * dy2 - dx2 * dy1
  g = (dx3 * dy2 - dx2 * dy3) / det
  h = (dx1 * dy3 - dx3 * dy1) / det
  square_to_quad = jnp.array([
      [x1 - x0 + g * x1, x3 - x0 + h * x3, x0],
      [y1 - y0 + g * y1, y3 - y0 + h * y3, y0],
      [g, h, 1.0]])
  to_unit = jnp.array([[0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 1.0]])
  q = _inv3(_mm(square_to_quad, to_unit))
  return q / q[2, 2]


def sampling_matrix(params: AugmentParams) -> jax.Array:
  """T in normalised patch coordinates: output (x, y, 1) -> input."""
  eye = jnp.eye(3, dtype=jnp.float32)
  sx = jnp.where(params.k & 1, -1.0, 1.0)
  sy = jnp.where(params.k & 2, -1.0, 1.0)
  zero, one = jnp.float32(0), jnp.float32(1)
  d = jnp.where(params.k & 4,
                jnp.array([[zero, sx, zero], [sy, zero, zero],
                           [zero, zero, one]]),
                jnp.array([[sx, zero, zero], [zero, sy, zero],
                           [zero, zero, one]]))
  a = jnp.deg2rad(params.angle)
  c, s = jnp.cos(a), jnp.sin(a)
  r = jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  inv = 1.0 / params.scale
  z = jnp.array([[inv, 0.0, (1 - inv) * (2 * params.col_pct - 1)],
                 [0.0, inv, (1 - inv) * (2 * params.row_pct - 1)],
                 [0.0, 0.0, 1.0]])
  m = params.warp
  targ = jnp.array([[-1 - m[3], -1 - m[1]], [-1 - m[2], 1 + m[1]],
                    [1 + m[3], -1 - m[0]], [1 + m[2], 1 + m[0]]])
  h = _warp_homography(targ)
  # Where a transform does not fire its matrix is exactly the identity, which
  # keeps flips and 90° rotations pixel-exact.
  r = jnp.where(params.do_rotate, r, eye)
  z = jnp.where(params.do_zoom, z, eye)
  h = jnp.where(params.do_warp, h, eye)
  return _mm(_mm(_mm(d, r), z), h)


def _to_pixels(t: jax.Array, patch_size: int) -> jax.Array:
  """Re-expresses T in pixels about the patch centre (S T S^-1)."""
  s = patch_size / 2.0
  return t * jnp.array([[1.0, 1.0, s], [1.0, 1.0, s], [1 / s, 1 / s, 1.0]])


def _reflect(i: jax.Array, n: int) -> jax.Array:
  """Half-sample symmetric index reflection into [0, n)."""
  i = jnp.mod(i, 2 * n)
  return jnp.where(i < n, i, 2 * n - 1 - i)


def warp_image(crop: jax.Array, t_px: jax.Array,
               patch_size: int) -> jax.Array:
  """Bilinear sample of a [C, C, 3] crop at T(output grid); float 0..255."""
  c = crop.shape[0]
  centre = jnp.arange(patch_size, dtype=jnp.float32) + 0.5 - patch_size / 2
  gx, gy = jnp.meshgrid(centre, centre)  # [P, P], exact half-integers.
  # Elementwise rather than a matmul, so no reduced-precision path applies.
  sx, sy, sw = (t_px[i, 0] * gx + t_px[i, 1] * gy + t_px[i, 2]
                for i in range(3))
  # Crop pixel i covers [i, i + 1); its centre is at i + 0.5.
  fx = sx / sw + (c / 2 - 0.5)
  fy = sy / sw + (c / 2 - 0.5)
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xs = (_reflect(x0, c), _reflect(x0 + 1, c))
  ys = (_reflect(y0, c) * c, _reflect(y0 + 1, c) * c)
  flat = crop.reshape(c * c, crop.shape[-1])
  v = [[flat[yy + xx].astype(jnp.float32) for xx in xs] for yy in ys]
  top = (1 - wx) * v[0][0] + wx * v[0][1]
  bottom = (1 - wx) * v[1][0] + wx * v[1][1]
  return (1 - wy) * top + wy * bottom


def lighting(x: jax.Array, params: AugmentParams) -> jax.Array:
  """fastai's brightness then contrast in logit space of a 0..1 image."""
  logit = jnp.log(x) - jnp.log1p(-x)  # +-inf at 0 and 1, kept by sigmoid.
  b = params.change
  logit = logit + jnp.where(params.do_brightness,
                            jnp.log(b) - jnp.log1p(-b), 0.0)
  logit = logit * jnp.where(params.do_contrast, params.contrast, 1.0)
  on = params.do_brightness | params.do_contrast
  return jnp.where(on, jax.nn.sigmoid(logit), x)


def transform_boxes(
    t_px: jax.Array, centers: jax.Array, valid: jax.Array, *,
    patch_size: int, crop: int, box_size: float,
) -> tuple[jax.Array, jax.Array]:
  """Boxes (x1, y1, x2, y2) in patch pixels for centres in crop pixels.

  The corners go through T^-1; their bounding box is clipped to the patch;
  a box left with no width or height is dropped, as fastai's ImageBBox.
  """
  half = box_size / 2.0
  offsets = jnp.array([[-half, -half], [-half, half], [half, -half],
                       [half, half]], jnp.float32)
  corners = centers[:, None, :].astype(jnp.float32) + offsets - crop / 2
  hom = jnp.concatenate([corners, jnp.ones_like(corners[..., :1])], -1)
  out = _mm(hom, _inv3(t_px).T)
  w = out[..., 2:]
  xy = out[..., :2] / w + patch_size / 2
  lo = jnp.clip(xy.min(axis=1), 0.0, patch_size)
  hi = jnp.clip(xy.max(axis=1), 0.0, patch_size)
  boxes = jnp.concatenate([lo, hi], -1)
  keep = valid.astype(bool) & jnp.all(hi > lo, -1) & jnp.all(w[..., 0] > 0, -1)
  return jnp.where(keep[:, None], boxes, 0.0), keep


# Colour augmentations by name: fn(key, image) -> image, on one image
# [P, P, 3] float32 in 0..1 after lighting, jittable. `AugmentConfig.colour`
# names the ones a run applies; see README.md, "Where to add an augmentation".
ColourAugmentation = Callable[[jax.Array, jax.Array], jax.Array]
COLOUR_AUGMENTATIONS: dict[str, ColourAugmentation] = {
    # Tellez et al. 2018's HED jitter, its two published strengths.
    "hed_light": functools.partial(stain_lib.hed_jitter, sigma=stain_lib.HED_LIGHT),
    "hed_strong": functools.partial(stain_lib.hed_jitter, sigma=stain_lib.HED_STRONG),
}
# RandStainNA draws from the run's statistics, which a fn(key, image) entry
# cannot hold: it is `AugmentConfig.randstainna`, fed `randstainna_stats`.
_RANDSTAINNA_STREAM = 0  # fold_in index of its key; the colour entries use 1, 2, ...


def colour_augmentation(name: str) -> ColourAugmentation:
  """The entry `name`; an unknown name lists the known ones."""
  if name not in COLOUR_AUGMENTATIONS:
    raise ValueError(f"augment.colour {name!r}: expected names from "
                     f"{sorted(COLOUR_AUGMENTATIONS) or 'COLOUR_AUGMENTATIONS (empty)'}")
  return COLOUR_AUGMENTATIONS[name]


def augment_image(
    crop: jax.Array, centers: jax.Array, valid: jax.Array,
    params: AugmentParams, *, patch_size: int, mean: jax.Array,
    std: jax.Array, box_size: float = 50.0, dtype: DTypeLike = jnp.float32,
    key: jax.Array | None = None, colour: Sequence[str] = (),
    stain: jax.Array | None = None, stain_method: str = "none",
    randstainna_stats: jax.Array | None = None, randstainna_space: str = "none",
    randstainna_sigma: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One crop [C, C, 3] uint8 with given parameters; see `augment_batch`.

  `colour` augmentations and RandStainNA draw from keys folded from `key`, so
  they leave the geometric and lighting draws unchanged.
  """
  t_px = _to_pixels(sampling_matrix(params), patch_size)
  x = warp_image(crop, t_px, patch_size) / 255.0
  if stain is not None:
    x = stain_lib.apply(x, stain, stain_method)
  if randstainna_stats is not None and randstainna_space != "none":
    x = stain_lib.randstainna(jax.random.fold_in(key, _RANDSTAINNA_STREAM), x,
                              randstainna_stats, randstainna_space, randstainna_sigma)
  x = lighting(x, params)
  for i, name in enumerate(colour):
    x = colour_augmentation(name)(jax.random.fold_in(key, i + 1), x)
  boxes, keep = transform_boxes(t_px, centers, valid, patch_size=patch_size,
                                crop=crop.shape[0], box_size=box_size)
  return ((x - mean) / std).astype(dtype), boxes, keep


@functools.partial(
    jax.jit,
    static_argnames=("patch_size", "config", "box_size", "dtype"))
def augment_batch(
    key: jax.Array, crops: jax.Array, centers: jax.Array, valid: jax.Array,
    *, patch_size: int, mean: Sequence[float] | jax.Array,
    std: Sequence[float] | jax.Array,
    config: AugmentConfig = AugmentConfig(), box_size: float = 50.0,
    dtype: DTypeLike = jnp.float32, stain: jax.Array | None = None,
    randstainna_stats: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Augments and normalises a batch of host crops.

  Args:
    key: PRNG key; image b uses `jax.random.split(key, B)[b]`.
    crops: uint8 [B, C, C, 3], C = crop_size(patch_size), the patch centred.
    centers: [B, N, 2] object centres (x, y) in crop pixels (pixel i spans
      [i, i + 1)).
    valid: bool [B, N], which slots hold objects.
    patch_size: output side P.
    mean, std: per-channel statistics in the 0..1 scale (pixel / 255).
    config: the transforms; `enabled=False` gives the plain centre patch.
    box_size: side of the square box around each centre, in crop pixels.
    dtype: output image dtype, e.g. float32 or bfloat16.
    stain: float32 [B, 4, 3], each image's stain normalisation params
      (`config.stain_normalization`); None: none.
    randstainna_stats: float32 [4, 3], the run's RandStainNA distribution
      (`config.randstainna`); None: no RandStainNA.

  Returns:
    images [B, P, P, 3] in `dtype`, boxes float32 [B, N, 4] as (x1, y1, x2,
    y2) in patch pixels (zero where dropped), and valid [B, N]. Slots keep
    their order, so labels from the host stay aligned.
  """
  b, c = crops.shape[0], crops.shape[1]
  if c < patch_size or (c - patch_size) % 2:
    raise ValueError(f"crop side {c} does not centre a {patch_size} patch")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if not config.enabled:
    # Identity geometry: a slice instead of a gather.
    m = (c - patch_size) // 2
    images = crops[:, m:m + patch_size, m:m + patch_size] / 255.0
    if stain is not None:
      images = jax.vmap(functools.partial(stain_lib.apply, method=config.stain_normalization)
                        )(images, stain)
    eye = _to_pixels(jnp.eye(3), patch_size)
    boxes, keep = jax.vmap(functools.partial(
        transform_boxes, eye, patch_size=patch_size, crop=c,
        box_size=box_size))(centers, valid)
    return ((images - mean) / std).astype(dtype), boxes, keep
  keys = jax.random.split(key, b)
  params = jax.vmap(sample_params, (0, None))(keys, config)
  fn = functools.partial(augment_image, patch_size=patch_size, mean=mean,
                         std=std, box_size=box_size, dtype=dtype, colour=config.colour,
                         stain_method=config.stain_normalization,
                         randstainna_stats=randstainna_stats,
                         randstainna_space=config.randstainna,
                         randstainna_sigma=config.randstainna_sigma)
  # `stain` may be None: a pytree without leaves, which vmap passes through.
  return jax.vmap(lambda c, x, v, p, k, s: fn(c, x, v, p, key=k, stain=s))(
      crops, centers, valid, params, keys, stain)
