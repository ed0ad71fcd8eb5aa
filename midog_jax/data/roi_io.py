"""Reading and writing region-of-interest TIFFs.

The MIDOG++ ROIs are most likely single-page, striped, uncompressed RGB(A)
TIFFs with resolution tags in pixels per inch. The reader also accepts tiled,
LZW, deflate, JPEG and pyramidal files (level 0), and greyscale images.
"""

from __future__ import annotations

import os

import numpy as np
import tifffile

_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # ResolutionUnit: 2 inch, 3 cm.


class RoiError(ValueError):
  """An image file that cannot be used; the message names it and the fix."""


def _open(path: str) -> tifffile.TiffFile:
  if not os.path.exists(path):
    raise RoiError(
        f"{path}: image file not found. Download the MIDOG++ images from "
        "figshare (see README) and point the command at their folder.")
  try:
    return tifffile.TiffFile(path)
  except (tifffile.TiffFileError, ValueError, OSError, EOFError) as e:
    raise RoiError(
        f"{path}: not a readable TIFF ({e}). Download the file again; "
        "it may be truncated or not a TIFF at all.") from None


def read_um_per_px(path: str | os.PathLike[str]) -> float | None:
  """Micrometres per pixel from the resolution tags, or None when absent."""
  path = os.fspath(path)
  with _open(path) as tif:
    return _um_per_px(tif.pages.first)


def _um_per_px(page) -> float | None:
  tags = page.tags
  if "XResolution" not in tags:
    return None
  unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
  num, den = tags["XResolution"].value
  if int(unit) not in _UM_PER_UNIT or not num or not den:
    return None
  return _UM_PER_UNIT[int(unit)] * den / num


def missing_bytes(path: str | os.PathLike[str]) -> int:
  """Bytes of image data the TIFF's directories point past its end (0: whole).

  Reads only the directories: a cheap check that a download is complete.
  """
  path = os.fspath(path)
  with _open(path) as tif:
    return _missing_bytes(tif, path)


def _missing_bytes(tif: tifffile.TiffFile, path: str) -> int:
  try:
    ends = [o + c for page in tif.pages
            for o, c in zip(page.dataoffsets, page.databytecounts)]
  except Exception as e:  # tifffile raises many types for broken directories.
    raise RoiError(f"{path}: not a readable TIFF ({e}). Download the file again; "
                   "it may be truncated.") from None
  if not ends:
    raise RoiError(f"{path}: the TIFF holds no image data")
  return max(0, max(ends) - os.path.getsize(path))


def check_file(path: str | os.PathLike[str],
               expected_size: tuple[int, int] | None = None) -> None:
  """What `read_roi` would refuse, found from the headers alone (milliseconds).

  Raises:
    RoiError: missing, truncated or unreadable file, unsupported pixel type,
      or a size other than `expected_size` (width, height).
  """
  path = os.fspath(path)
  with _open(path) as tif:
    if missing := _missing_bytes(tif, path):
      raise RoiError(f"{path}: {missing} bytes of image data are missing; the file is "
                     "truncated. Download it again.")
    series = tif.series[0]
    level = series.levels[0] if series.levels else series
    dtype, shape, axes = level.dtype, level.shape, level.axes
  if dtype != np.uint8:
    _to_rgb(np.zeros((1, 1, 3), dtype), path, None)  # Raises its message.
  if expected_size is not None and "X" in axes and "Y" in axes:
    width, height = shape[axes.index("X")], shape[axes.index("Y")]
    if (width, height) != tuple(expected_size):
      _size_error(path, width, height, expected_size)


def _size_error(path: str, width: int, height: int,
                expected_size: tuple[int, int]) -> None:
  raise RoiError(
      f"{path}: image is {width} x {height} px but the annotations say "
      f"{expected_size[0]} x {expected_size[1]}; the file does not belong to "
      "this annotation set (wrong or re-exported image).")


def read_roi(path: str | os.PathLike[str],
             expected_size: tuple[int, int] | None = None) -> np.ndarray:
  """Reads level 0 of a TIFF as uint8 RGB [height, width, 3].

  Args:
    path: the TIFF.
    expected_size: (width, height) the annotations give, checked if set.

  Raises:
    RoiError: missing, truncated or unreadable file, unsupported pixel type,
      or a size other than `expected_size`.
  """
  path = os.fspath(path)
  with _open(path) as tif:
    try:
      series = tif.series[0]
      level = series.levels[0] if series.levels else series
      image = level.asarray()
    except Exception as e:  # tifffile raises many types for broken data.
      raise RoiError(
          f"{path}: image data cannot be decoded ({type(e).__name__}: {e}). "
          "The file is probably truncated; download it again.") from None
  return _to_rgb(image, path, expected_size)


def _to_rgb(image: np.ndarray, path: str,
            expected_size: tuple[int, int] | None) -> np.ndarray:
  if image.dtype != np.uint8:
    raise RoiError(
        f"{path}: {image.dtype} pixels are not supported; convert the image "
        "to 8-bit RGB (e.g. `vips cast` or `tifffile` + scaling) first.")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  elif image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
    image = np.moveaxis(image, 0, -1)  # Planar (separate) configuration.
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise RoiError(
        f"{path}: shape {image.shape} is not an RGB, RGBA or greyscale image")
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  image = np.ascontiguousarray(image[:, :, :3])
  if expected_size is not None:
    if image.shape[:2] != (expected_size[1], expected_size[0]):
      _size_error(path, image.shape[1], image.shape[0], expected_size)
  return image


def write_roi(path: str | os.PathLike[str], rgb: np.ndarray, um_per_px: float,
              rgba: bool = True, compression: str | None = None,
              tile: tuple[int, int] | None = None,
              pyramid_levels: int = 0) -> None:
  """Writes an ROI the way the MIDOG++ exports most likely are.

  Defaults: one page, striped, uncompressed, RGBA with an opaque alpha
  channel, resolution in pixels per inch. `compression`, `tile` and
  `pyramid_levels` produce the other layouts the reader accepts.
  """
  rgb = np.asarray(rgb, dtype=np.uint8)
  data = rgb
  extrasamples = None
  if rgba:
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    data = np.concatenate([rgb, alpha], axis=2)
    extrasamples = ("unassalpha",)
  dpi = 25_400.0 / um_per_px
  kwargs = dict(photometric="rgb", extrasamples=extrasamples,
                resolution=(dpi, dpi), resolutionunit="INCH",
                compression=compression, tile=tile, metadata=None)
  with tifffile.TiffWriter(os.fspath(path)) as tif:
    tif.write(data, subifds=pyramid_levels or None, **kwargs)
    for level in range(1, pyramid_levels + 1):
      step = 2 ** level
      tif.write(data[::step, ::step], subfiletype=1,
                **{**kwargs, "resolution": (dpi / step, dpi / step)})
