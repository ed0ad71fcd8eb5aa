import numpy as np
import pytest
import tifffile

from midog_jax.data import roi_io


def _image(h=96, w=128, smooth=False):
  rng = np.random.default_rng(0)
  if smooth:  # JPEG is lossy: compare on a smooth image.
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], -1).astype(np.uint8)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kwargs", [
    {},  # The real exports' likely layout: striped, uncompressed, RGBA.
    dict(rgba=False),
    dict(compression="lzw", tile=(64, 64)),
    dict(compression="deflate"),
    dict(compression="zstd", tile=(32, 32), rgba=False),
    dict(pyramid_levels=2, tile=(32, 32)),
])
def test_lossless_layouts_round_trip(tmp_path, kwargs):
  img = _image()
  roi_io.write_roi(tmp_path / "a.tiff", img, 0.2274, **kwargs)
  out = roi_io.read_roi(tmp_path / "a.tiff", expected_size=(128, 96))
  np.testing.assert_array_equal(out, img)
  assert roi_io.read_um_per_px(tmp_path / "a.tiff") == pytest.approx(0.2274, rel=1e-6)


def test_default_layout_is_single_page_striped_uncompressed_rgba(tmp_path):
  roi_io.write_roi(tmp_path / "a.tiff", _image(), 0.25)
  with tifffile.TiffFile(tmp_path / "a.tiff") as tif:
    page = tif.pages.first
    assert len(tif.pages) == 1 and not page.is_tiled
    assert page.compression == 1 and page.samplesperpixel == 4
    assert page.tags["ResolutionUnit"].value == 2  # Inch.


def test_jpeg_and_greyscale(tmp_path):
  img = _image(smooth=True)
  roi_io.write_roi(tmp_path / "j.tiff", img, 0.25, compression="jpeg", rgba=False)
  assert np.abs(roi_io.read_roi(tmp_path / "j.tiff").astype(int) - img).max() < 12
  tifffile.imwrite(tmp_path / "g.tiff", img[..., 0])
  out = roi_io.read_roi(tmp_path / "g.tiff")
  assert out.shape == (96, 128, 3) and (out[..., 2] == img[..., 0]).all()
  assert roi_io.read_um_per_px(tmp_path / "g.tiff") in (None, 1e4 * 2.54)


def test_resolution_in_centimetres(tmp_path):
  tifffile.imwrite(tmp_path / "c.tiff", _image(), resolution=(40_000, 40_000),
                   resolutionunit="CENTIMETER")
  assert roi_io.read_um_per_px(tmp_path / "c.tiff") == pytest.approx(0.25)


def test_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(roi_io.RoiError, match="a.tiff: image file not found"):
    roi_io.read_roi(tmp_path / "a.tiff")
  (tmp_path / "b.tiff").write_text("not a tiff")
  with pytest.raises(roi_io.RoiError, match="b.tiff: not a readable TIFF"):
    roi_io.read_roi(tmp_path / "b.tiff")
  roi_io.write_roi(tmp_path / "c.tiff", _image(), 0.25)
  data = (tmp_path / "c.tiff").read_bytes()
  (tmp_path / "c.tiff").write_bytes(data[:len(data) // 2])
  with pytest.raises(roi_io.RoiError, match="c.tiff.*truncated"):
    roi_io.read_roi(tmp_path / "c.tiff")
  roi_io.write_roi(tmp_path / "d.tiff", _image(), 0.25)
  with pytest.raises(roi_io.RoiError, match=r"d.tiff: image is 128 x 96 px but the annotations say 100 x 96"):
    roi_io.read_roi(tmp_path / "d.tiff", expected_size=(100, 96))
  tifffile.imwrite(tmp_path / "e.tiff", _image().astype(np.uint16) * 256)
  with pytest.raises(roi_io.RoiError, match="uint16 pixels are not supported"):
    roi_io.read_roi(tmp_path / "e.tiff")
