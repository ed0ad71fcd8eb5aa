"""Slides through OpenSlide and the TIFF reader: pixels, thumbnails, resolution, tissue, errors."""

import numpy as np
import openslide
import pytest
import tifffile

from midog_jax.data import roi_io
from midog_jax.data import slide_reader
from midog_jax.data import synthetic_slides

SPEC = synthetic_slides.SlideSpec(1000, 700, seed=5, figures_per_mm2=400, imposters_per_mm2=200)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The same synthetic slide as a generic tiled TIFF and an Aperio SVS, and its pixels."""
  root = tmp_path_factory.mktemp("slides")
  paths = {fmt: str(root / f"s.{'tif' if fmt == 'tiff' else 'svs'}")
           for fmt in synthetic_slides.FORMATS}
  for fmt, path in paths.items():
    truth = synthetic_slides.write_slide(path, SPEC, fmt)
  return paths, synthetic_slides.render(SPEC), truth


def _box_mean(image, d):
  """Oracle thumbnail: mean of each d x d block, the image padded with white."""
  h, w = image.shape[:2]
  hh, ww = -(-h // d) * d, -(-w // d) * d
  pad = np.full((hh, ww, 3), 255.0)
  pad[:h, :w] = image
  return pad.reshape(hh // d, d, ww // d, d, 3).mean((1, 3))


def test_openslide_reads_the_written_pixels_in_both_formats(written):
  paths, pixels, truth = written
  assert openslide.OpenSlide.detect_format(paths["tiff"]) == "generic-tiff"
  assert openslide.OpenSlide.detect_format(paths["svs"]) == "aperio"
  identities = set()
  for fmt, path in paths.items():
    with slide_reader.open_slide(path) as slide:
      assert slide.vendor == ("aperio" if fmt == "svs" else "generic-tiff")
      assert (slide.width, slide.height) == (1000, 700) and slide.um_per_px == 0.25
      np.testing.assert_array_equal(slide.read(0, 0, 1000, 700), pixels)
      # Across tile seams, and past the edges (white, as glass).
      part = slide.read(250, 500, 300, 260)
      np.testing.assert_array_equal(part[:200], pixels[500:700, 250:550])
      assert (part[200:] == 255).all()
      assert (slide.read(-10, -5, 20, 20)[:5] == 255).all()
      thumb = slide.thumbnail(16)  # From the 4x level, resized by 4.
      assert thumb.shape == (44, 63, 3)
      assert np.abs(thumb.astype(float) - _box_mean(pixels, 16)).max() <= 2
      identities.add(slide.identity)
  assert len(identities) == 2  # Two files, two identities; a copy keeps its identity:
  copy = paths["svs"] + ".copy.svs"
  with open(paths["svs"], "rb") as f, open(copy, "wb") as g:
    g.write(f.read())
  with slide_reader.open_slide(copy) as a, slide_reader.open_slide(paths["svs"]) as b:
    assert a.identity == b.identity
  assert len(truth.figures) > 5 and truth.tissue_mm2 > 0


def test_tiff_rois_and_resolution_tags(tmp_path, written):
  _, pixels, _ = written
  roi = tmp_path / "roi.tiff"
  roi_io.write_roi(roi, pixels, 0.23)  # Striped RGBA, as MIDOG++: OpenSlide refuses it.
  assert openslide.OpenSlide.detect_format(str(roi)) is None
  with slide_reader.open_slide(roi) as slide:
    assert slide.vendor == "tiff-roi" and abs(slide.um_per_px - 0.23) < 1e-9
    np.testing.assert_array_equal(slide.read(100, 50, 64, 64), pixels[50:114, 100:164])
    assert np.abs(slide.thumbnail(8).astype(float) - _box_mean(pixels, 8)).max() <= 1
  bare = tmp_path / "bare.tif"  # Tiled, no resolution tags: the slide does not say.
  tifffile.imwrite(bare, pixels, tile=(256, 256), photometric="rgb", metadata=None)
  with slide_reader.open_slide(bare) as slide:
    assert slide.vendor == "generic-tiff" and slide.um_per_px is None
  inch = tmp_path / "inch.tif"  # Pixels per inch, 0.5 µm/px.
  tifffile.imwrite(inch, pixels, tile=(256, 256), photometric="rgb", metadata=None,
                   resolution=(50800, 50800), resolutionunit="INCH")
  with slide_reader.open_slide(inch) as slide:
    assert abs(slide.um_per_px - 0.5) < 1e-9


def test_unreadable_and_unsupported_files_are_one_line_naming_them(tmp_path, written):
  paths, _, _ = written
  (tmp_path / "notes.txt").write_text("not a slide")
  truncated = tmp_path / "cut.svs"
  truncated.write_bytes(open(paths["svs"], "rb").read()[:5000])
  for path, message in ((tmp_path / "missing.svs", "no such file"),
                        (tmp_path / "notes.txt", "not a slide format this reads"),
                        (truncated, "cut.svs")):
    with pytest.raises(slide_reader.SlideError) as e:
      with slide_reader.open_slide(path) as slide:
        slide.read(0, 0, 1000, 700)  # Opening may succeed; reading the tiles cannot.
    text = str(e.value)
    assert str(path) in text and message in text and "\n" not in text
  with pytest.raises(slide_reader.SlideError, match="Aperio .svs, Hamamatsu .ndpi"):
    slide_reader.open_slide(tmp_path / "notes.txt")


def test_resolution_is_matched_to_training_or_refused():
  trained = (0.23, 0.25)
  assert slide_reader.frame_scale(0.25, trained) == 1.0
  assert slide_reader.frame_scale(0.2527, trained) == 1.0  # Aperio's 40x: within 10 %.
  assert slide_reader.frame_scale(0.5, trained) == 0.5  # 20x: enlarged to 0.25 µm/px.
  assert slide_reader.frame_scale(0.121, trained) == pytest.approx(0.23 / 0.121)
  with pytest.raises(slide_reader.SlideError, match="coarser than a 20x scan"):
    slide_reader.frame_scale(1.0, trained, "x.svs")
  with pytest.raises(slide_reader.SlideError, match="finer than a quarter"):
    slide_reader.frame_scale(0.05, trained, "x.svs")
  assert slide_reader.mask_downsample(0.25) == 32 and slide_reader.mask_downsample(0.5) == 16


def test_resampled_window_is_bilinear():
  # A ramp 2x along x: bilinear enlargement by 2 of a linear ramp is the ramp itself.
  ramp = np.broadcast_to((np.arange(120) * 2)[None, :, None], (100, 120, 3)).astype(np.uint8)

  class Ramp(slide_reader.Slide):
    width, height = 120, 100

    def read(self, x, y, w, h):
      xs, ys = np.clip(np.arange(x, x + w), 0, 119), np.clip(np.arange(y, y + h), 0, 99)
      return ramp[ys][:, xs]

  window = slide_reader.read_window(Ramp(), 40, 20, 32, scale=0.5).astype(float)
  # Frame pixel j (centre j + 0.5) is level-0 position (j + 0.5) / 2, pixel index - 0.5.
  expected = 2 * ((np.arange(40, 72) + 0.5) * 0.5 - 0.5)
  assert np.abs(window[..., 0] - expected[None, :]).max() <= 1.0
  assert (window[..., 0] == window[..., 2]).all()
  np.testing.assert_array_equal(slide_reader.read_window(Ramp(), 3, 4, 16), ramp[4:20, 3:19])


def test_otsu_threshold_matches_the_definition():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(5, 2, 3000), rng.normal(60, 8, 1000)]).clip(0, 255)
  values = values.astype(np.uint8)

  def between(t):  # Classes < t and >= t, by their definition.
    a, b = values[values < t].astype(float), values[values >= t].astype(float)
    if not len(a) or not len(b):
      return -1
    return len(a) * len(b) * (a.mean() - b.mean()) ** 2

  best = max(range(1, 256), key=between)
  t = slide_reader.otsu_threshold(values)
  assert between(t) == pytest.approx(between(best))
  np.testing.assert_array_equal(values < t, values < best)  # The same two classes.
  assert abs(int((values < t).sum()) - 3000) < 10  # The two modes apart.


def test_tissue_mask_finds_tissue_not_glass_pen_or_dust(written):
  rng = np.random.default_rng(1)
  thumb = np.clip(245 + rng.normal(0, 1.5, (80, 100, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
  tissue = np.zeros((80, 100), bool)
  tissue[10:50, 10:60] = True
  thumb[tissue] = (225, 150, 200)  # Eosin pink.
  thumb[25:28, 30:33] = 245  # A small hole (9 cells = 0.0006 mm² at 8 µm): filled.
  thumb[60:75, 70:95] = (40, 60, 200)  # Blue pen.
  thumb[62:70, 20:40] = (30, 160, 60)  # Green pen.
  thumb[5, 80] = (10, 10, 10)  # A black speck.
  thumb[70:73, 3:8] = (225, 150, 200)  # A pink speck of 15 cells (0.001 mm²): dust.
  mask = slide_reader.tissue_mask(thumb, 8.0)
  np.testing.assert_array_equal(mask, tissue)
  # On a synthetic slide, the mask is the written tissue to within a few edge cells.
  paths, _, truth = written
  with slide_reader.open_slide(paths["svs"]) as slide:
    found = slide_reader.tissue_mask(slide.thumbnail(truth.field_downsample), 8.0)
  assert found.shape == truth.tissue.shape
  iou = (found & truth.tissue).sum() / (found | truth.tissue).sum()
  assert iou > 0.9
