"""Whole slides: windows over tissue, seams counted once, exact counts and hotspot, resolution,
resume after an interruption or a kill, and one run end to end with a trained run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

from midog_jax import slides as slides_cli
from midog_jax.data import roi_io
from midog_jax.data import slide_reader
from midog_jax.data import synthetic_slides
from midog_jax.detection import ensemble
from midog_jax.detection import hotspot
from midog_jax.detection import predictions
from midog_jax.detection import slide_outputs
from midog_jax.detection import slides
from midog_jax.detection import sliding_window
from tests.helpers import ROOT

PATCH, BATCH, K = 64, 8, 32
# Hotspot 0.1 x 0.075 mm: 400 x 300 px at 0.25 µm/px, even sizes for the integer oracle.
HOTSPOT = dict(hotspot_mm2=0.0075, hotspot_aspect=4 / 3)


class TruthWindows:
  """Stands in for the network: the ground-truth points inside each window.

  Figures score 0.9 and imposters 0.3 (below the operating point 0.5), a
  little less or more by the window's place; every point in a seam comes
  back once per window that holds it. Tests stitching, not learning.
  """

  def __init__(self, truth, scale=1.0, fail_after=None, delay=0.0):
    self.points = np.concatenate([truth.figures, truth.imposters]) / scale  # Frame px.
    self.scores = np.r_[np.full(len(truth.figures), 0.9), np.full(len(truth.imposters), 0.3)]
    self.fail_after, self.delay = fail_after, delay
    self.calls = self.windows = 0

  def __call__(self, windows, origins):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt  # As Ctrl-C or SIGTERM in the middle of a band.
    time.sleep(self.delay)
    self.calls += 1
    self.windows += len(windows)
    centres, scores = np.zeros((len(windows), K, 2)), np.zeros((len(windows), K))
    valid = np.zeros((len(windows), K), bool)
    for b, origin in enumerate(origins):
      rel = self.points - origin
      idx = np.nonzero(((rel >= 0) & (rel < PATCH)).all(1))[0][:K]
      centres[b, :len(idx)] = rel[idx]
      scores[b, :len(idx)] = self.scores[idx] - 1e-5 * ((origin[0] + 3 * origin[1]) % 97)
      valid[b, :len(idx)] = True
    return centres, scores, valid


def model_of(fn):
  return slides.Model(fn, PATCH, BATCH, 0, 0.1, (0.23, 0.25), "truth-double")


def settings(**kw):
  return slides.Settings(0.5, "test", **{**HOTSPOT, "band_windows": 64, "workers": 2, **kw})


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
  """{name: (path, truth)}: an SVS at 0.25 µm/px and a generic TIFF at 0.5 µm/px."""
  root = tmp_path_factory.mktemp("wsi")
  specs = {"a.svs": synthetic_slides.SlideSpec(1536, 1152, seed=3, figures_per_mm2=700,
                                               imposters_per_mm2=300),
           "b.tif": synthetic_slides.SlideSpec(768, 576, um_per_px=0.5, seed=4,
                                               figures_per_mm2=700, imposters_per_mm2=300)}
  out = {}
  for name, spec in specs.items():
    path = str(root / name)
    out[name] = (path, synthetic_slides.write_slide(path, spec, "svs" if name.endswith("svs")
                                                    else "tiff"))
  return out


def _region(path):
  with slide_reader.open_slide(path) as s:
    cell = slide_reader.mask_downsample(s.um_per_px)
    return slide_reader.tissue_mask(s.thumbnail(cell), cell * s.um_per_px), cell, s


def test_windows_cover_exactly_the_tissue(slide_files):
  for name, scale in (("a.svs", 1.0), ("b.tif", 0.5)):
    path, _ = slide_files[name]
    region, cell, s = _region(path)
    xy, local, box = slides.select_windows(region, cell, s.width, s.height, scale, PATCH, 0)
    assert len(xy) == len(np.unique(xy, axis=0)) > 10
    # Level-0 canvas, oracle by painting: every tissue px under a window ...
    covered = np.zeros((s.height, s.width), bool)
    tissue = np.zeros((s.height, s.width), bool)
    for i, j in zip(*np.nonzero(region)):
      tissue[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = True
    for x, y in xy:
      x0, y0 = int(x * scale), int(y * scale)
      covered[y0:int((y + PATCH) * scale), x0:int((x + PATCH) * scale)] = True
      # ... and every window over some tissue.
      assert tissue[y0:int((y + PATCH) * scale), x0:int((x + PATCH) * scale)].any()
    assert covered[tissue].all()
    # The windows are those of the grid over the tissue's box, no others.
    grid = sliding_window.window_origins(box[2], box[3], PATCH, slides.OVERLAP, 0) + box[:2]
    assert {tuple(o) for o in xy} <= {tuple(o) for o in grid} and len(xy) < len(grid)
    np.testing.assert_array_equal(xy - local, np.broadcast_to(box[:2], xy.shape))


def _brute_hotspot(points, w, h, region, cell, width, height):
  """Max points in a closed w x h rectangle over every integer corner, centre on tissue."""
  pad_x, pad_y = w + 2, h + 2
  hist = np.zeros((height + 2 * pad_y + 1, width + 2 * pad_x + 1), np.int64)
  for x, y in points:
    hist[int(y) + pad_y, int(x) + pad_x] += 1
  sat = np.pad(hist.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  y0, x0 = np.mgrid[0:height + pad_y, 0:width + pad_x]  # Corner - pad, in hist indices.
  count = (sat[y0 + h + 1, x0 + w + 1] - sat[y0, x0 + w + 1] - sat[y0 + h + 1, x0]
           + sat[y0, x0])
  cx, cy = x0 - pad_x + w // 2, y0 - pad_y + h // 2  # Integer centres.
  allowed = np.zeros((height + 1, width + 1), bool)  # Closed cells, painted one by one.
  for i, j in zip(*np.nonzero(region)):
    allowed[i * cell:min((i + 1) * cell, height) + 1,
            j * cell:min((j + 1) * cell, width) + 1] = True
  ok = (cx >= 0) & (cy >= 0) & (cx <= width) & (cy <= height)
  ok[ok] = allowed[cy[ok], cx[ok]]
  return int(np.where(ok, count, 0).max())


def test_seams_are_counted_once_and_counts_and_hotspot_are_exact(slide_files, tmp_path):
  path, truth = slide_files["a.svs"]
  double = TruthWindows(truth)
  report = slides.process_slide(path, model_of(double), settings(), str(tmp_path), progress=False)
  region, cell, s = _region(path)
  folder = tmp_path / "a"
  # Raw detections hold the seams' duplicates; the suppression leaves one per point.
  raw = sum(len(np.load(folder / "bands" / f)["scores"]) for f in os.listdir(folder / "bands")
            if f.endswith(".npz"))
  assert raw > len(truth.figures) + len(truth.imposters)
  assert hotspot.in_region(truth.figures, region, cell).all()  # All figures on the mask.
  assert report["figures"] == len(truth.figures)
  assert report["detections"] == len(truth.figures) + len(truth.imposters)
  # Per mm² of tissue: the mask's cells inside the slide, counted by painting.
  painted = np.zeros((s.height, s.width), bool)
  for i, j in zip(*np.nonzero(region)):
    painted[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = True
  assert report["tissue"]["mm2"] == pytest.approx(painted.sum() * 0.25 ** 2 / 1e6)
  assert report["figures_per_mm2"] == pytest.approx(len(truth.figures) / report["tissue"]["mm2"])
  assert abs(report["tissue"]["mm2"] - truth.tissue_mm2) < 0.05 * truth.tissue_mm2
  # The hotspot, against the oracle over every integer placement (truth points are whole px).
  spot = report["hotspot"]
  assert (round(spot["w_px"]), round(spot["h_px"])) == (400, 300)
  assert 3 < spot["figures"] < len(truth.figures) - 5  # Neither trivial nor everything.
  assert spot["figures"] == _brute_hotspot(truth.figures, 400, 300, region, cell,
                                           s.width, s.height)
  assert spot["figures"] == hotspot.count_in_rectangle(truth.figures, spot["x_px"],
                                                       spot["y_px"], spot["w_px"], spot["h_px"])
  # The outputs agree with each other and with the truth.
  found = predictions.read_predictions(folder / "detections.json", {"a.svs": 0.25})["a.svs"]
  assert len(found.xy) == report["detections"]
  figs = found.xy[found.scores > 0.5]
  d = np.hypot(*(figs[:, None] - truth.figures[None]).transpose(2, 0, 1))
  assert d.min(1).max() < 1e-3 and len(figs) == len(truth.figures)
  gj = json.loads((folder / "detections.geojson").read_text())["features"]
  assert len(gj) == report["figures"]
  assert all("probability" in f["properties"]["measurements"] for f in gj)
  rows = list(csv.DictReader(open(folder / "detections.csv")))
  assert sum(r["counted"] == "1" for r in rows) == report["figures"] == len(gj)
  box = json.loads((folder / "hotspot.geojson").read_text())["features"][0]
  assert box["properties"]["measurements"]["mitotic figures"] == spot["figures"]
  assert (folder / "picture.png").read_bytes()[:4] == b"\x89PNG"
  mask = np.asarray(Image.open(folder / "tissue.png"))
  np.testing.assert_array_equal(mask > 0, region)


def test_resolution_handling_and_a_batch_that_goes_on(slide_files, tmp_path):
  path, truth = slide_files["b.tif"]  # 0.5 µm/px: enlarged to the run's 0.25.
  report = slides.process_slide(path, model_of(TruthWindows(truth, scale=0.5)), settings(),
                                str(tmp_path), progress=False)
  assert report["resampled"] and report["detected_at_um_per_px"] == 0.25
  assert report["figures"] == len(truth.figures)
  rows = list(csv.DictReader(open(tmp_path / "b" / "detections.csv")))
  xy = np.array([[float(r["x_px"]), float(r["y_px"])] for r in rows if r["counted"] == "1"])
  d = np.hypot(*(xy[:, None] - truth.figures[None]).transpose(2, 0, 1))
  assert d.min(1).max() < 1e-6  # In the slide's own level-0 px.
  # A batch: a coarse slide refused, a file without resolution, a junk file; the rest goes on.
  coarse = tmp_path / "coarse.tif"
  roi_io.write_roi(coarse, np.full((300, 300, 3), 200, np.uint8), 1.0)
  bare = tmp_path / "bare.tiff"
  bare_pixels = synthetic_slides.render(synthetic_slides.SlideSpec(512, 384, seed=9))
  tifffile.imwrite(bare, bare_pixels)  # Striped, no resolution tags.
  (tmp_path / "junk.svs").write_text("no slide")
  double = TruthWindows(truth, scale=0.5)
  batch = list(slides.run_batch([str(coarse), str(bare), str(tmp_path / "junk.svs"), path],
                                model_of(double), settings(), str(tmp_path / "batch"), False))
  errors = [e for _, _, e in batch if e]
  assert "coarser than a 20x scan" in errors[0] and "coarse.tif" in errors[0]
  assert "pass --um-per-px" in errors[1] and "junk.svs: not a slide format" in errors[2]
  assert batch[3][1]["figures"] == len(truth.figures)
  summary = list(csv.DictReader(open(tmp_path / "batch" / "summary.csv")))
  assert [r["slide"] for r in summary] == ["b.tif"]
  assert list(summary[0]) == list(slide_outputs.SUMMARY_COLUMNS)
  assert int(summary[0]["figures"]) == len(truth.figures) and summary[0]["um_per_px"] == "0.5000"
  # A run's stain normalisation: estimated once per slide on its thumbnail, applied per window.
  thumbs, seen = [], []
  model = model_of(lambda w, o: (seen.append(int(w[0].max())), TruthWindows(truth)(w, o))[1])
  model.per_slide = lambda thumb: thumbs.append(thumb.shape) or (lambda w: w // 2)
  with_um = slides.process_slide(str(bare), model, settings(um_per_px=0.25), str(tmp_path),
                                 progress=False)
  assert with_um["um_per_px_from"] == "--um-per-px" and with_um["vendor"] == "tiff-roi"
  assert thumbs == [(384 // 32, 512 // 32, 3)] and seen and max(seen) <= 127


def test_roi_rectangle_and_qupath_polygon_limit_the_count(slide_files, tmp_path):
  path, truth = slide_files["a.svs"]
  roi = (0.0, 0.0, 768.0, 1152.0)  # The left half.
  left = slides.process_slide(path, model_of(TruthWindows(truth)), settings(roi=roi),
                              str(tmp_path / "rect"), progress=False)
  region, cell, _ = _region(path)
  cells = hotspot.roi_cells(region.shape, cell, roi)
  expected = hotspot.in_region(truth.figures, region & cells, cell).sum()
  assert left["figures"] == expected and 0 < expected < len(truth.figures)
  geo = tmp_path / "roi.geojson"  # The same half as a QuPath polygon annotation.
  geo.write_text(json.dumps({"type": "FeatureCollection", "features": [{
      "type": "Feature", "properties": {"objectType": "annotation"},
      "geometry": {"type": "Polygon",
                   "coordinates": [[[0, 0], [768, 0], [768, 1152], [0, 1152], [0, 0]]]}}]}))
  _, polygons = slide_reader.parse_roi(str(geo))
  poly = slides.process_slide(path, model_of(TruthWindows(truth)), settings(roi_polygons=polygons),
                              str(tmp_path / "poly"), progress=False)
  assert poly["figures"] == left["figures"] and poly["windows"] == left["windows"]
  for bad in ("1,2,3", "0,0,-5,5", str(tmp_path / "missing.geojson")):
    with pytest.raises(ValueError, match="--roi"):
      slide_reader.parse_roi(bad)


def test_an_interrupted_slide_resumes_from_its_last_band_and_finished_ones_are_reused(
    slide_files, tmp_path):
  path, truth = slide_files["a.svs"]
  whole = slides.process_slide(path, model_of(TruthWindows(truth)), settings(),
                               str(tmp_path / "whole"), progress=False)
  out = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):  # In the 4th batch of band 2 (8 batches a band).
    slides.process_slide(path, model_of(TruthWindows(truth, fail_after=11)), settings(), out,
                         progress=False)
  bands = sorted(f for f in os.listdir(os.path.join(out, "a", "bands")) if f.endswith(".npz"))
  assert bands == ["band_00000.npz"]
  assert not os.path.exists(os.path.join(out, "a", "report.json"))
  again = TruthWindows(truth)
  report = slides.process_slide(path, model_of(again), settings(), out, progress=False)
  assert report["windows_detected_now"] == whole["windows"] - 64  # Band 0 was kept.
  assert again.calls == -(-(whole["windows"] - 64) // BATCH)
  for key in ("figures", "detections", "tissue", "hotspot", "figures_per_mm2"):
    assert report[key] == whole[key]
  same = lambda name: (tmp_path / "whole" / "a" / name).read_bytes() == (  # noqa: E731
      tmp_path / "resumed" / "a" / name).read_bytes()
  assert same("detections.json") and same("detections.geojson") and same("detections.csv")
  # Finished: never computed again, whatever the reader's workers.
  idle = TruthWindows(truth)
  reused = slides.process_slide(path, model_of(idle), settings(workers=1), out, progress=False)
  assert idle.calls == 0 and reused["reused"] and reused["figures"] == whole["figures"]
  # A new operating point: a new report from the saved bands, no window detected.
  moved = slides.process_slide(path, model_of(idle), slides.Settings(0.2, "t", **HOTSPOT,
                                                                     band_windows=64),
                               out, progress=False)
  assert idle.calls == 0 and moved["figures"] == len(truth.figures) + len(truth.imposters)
  # Another model (or minimum score): the bands are detected again.
  other = slides.Model(idle, PATCH, BATCH, 0, 0.1, (0.23, 0.25), "another-double")
  slides.process_slide(path, other, settings(), out, progress=False)
  assert idle.windows >= whole["windows"]


class HalfSeen(TruthWindows):
  """A second member that sees only the even-numbered figures, at 0.7, and no imposter."""

  def __init__(self, truth, **kw):
    super().__init__(truth, **kw)
    self.points, self.scores = self.points[:len(truth.figures)][::2], np.full(
        len(truth.figures[::2]), 0.7)


class Stacked:
  """An ensemble's window function: the members' outputs with a leading member axis."""

  def __init__(self, *members):
    self.members = members

  def __call__(self, windows, origins):
    outs = [m(windows, origins) for m in self.members]
    return tuple(np.stack([o[j] for o in outs]) for j in range(3))


def ensemble_of(truth, **kw):
  return slides.Model(Stacked(TruthWindows(truth, **kw), HalfSeen(truth)), PATCH, BATCH, 0, 0.1,
                      (0.23, 0.25), "ensemble-double", members=2)


def test_an_ensemble_counts_the_figures_its_members_agree_on_and_resumes(slide_files, tmp_path):
  """Fused score: 0.8 where both members see a figure, 0.45 where one does, 0.15 for an
  imposter: at the operating point 0.5 exactly the even-numbered figures count, each
  once across seams and members; an interrupted ensemble resumes to the same files."""
  path, truth = slide_files["a.svs"]
  whole = slides.process_slide(path, ensemble_of(truth), settings(), str(tmp_path / "whole"),
                               progress=False)
  assert whole["figures"] == len(truth.figures[::2])
  assert whole["detections"] == len(truth.figures) + len(truth.imposters)
  found = predictions.read_predictions(tmp_path / "whole" / "a" / "detections.json",
                                       {"a.svs": 0.25})["a.svs"]
  counted = found.xy[found.scores > 0.5]
  d = np.hypot(*(counted[:, None] - truth.figures[::2][None]).transpose(2, 0, 1))
  assert d.min(1).max() < 1e-2 and d.min(0).max() < 1e-2
  np.testing.assert_allclose(np.sort(found.scores)[-3:], 0.8, atol=1e-3)
  band = np.load(tmp_path / "whole" / "a" / "bands" / "band_00000.npz")
  assert set(np.unique(band["member"])) == {0, 1}
  out = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    slides.process_slide(path, ensemble_of(truth, fail_after=11), settings(), out, progress=False)
  report = slides.process_slide(path, ensemble_of(truth), settings(), out, progress=False)
  assert report["windows_detected_now"] == whole["windows"] - 64
  for name in ("detections.json", "detections.csv", "hotspot.geojson"):
    assert (tmp_path / "whole" / "a" / name).read_bytes() == (
        tmp_path / "resumed" / "a" / name).read_bytes()


_KILLED = """
import sys
import numpy as np
from midog_jax.data import synthetic_slides
from midog_jax.detection import slides
from tests.detection import test_slides as t
path, out = sys.argv[1], sys.argv[2]
truth = synthetic_slides.SlideTruth(0, 0, 0.25, np.array(t.json_points(path, "figures")),
                                    np.array(t.json_points(path, "imposters")), None, 1)
slides.process_slide(path, t.model_of(t.TruthWindows(truth, delay=0.05)), t.settings(), out,
                     progress=False)
"""


def json_points(path, kind):
  return json.loads(open(synthetic_slides.truth_path(path)).read())[kind]


def test_resume_after_a_kill(slide_files, tmp_path):
  path, truth = slide_files["a.svs"]
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-c", _KILLED, path, str(out)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  band_dir = out / "a" / "bands"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and not (band_dir / "band_00001.npz").exists():
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # No handler runs: only what was renamed into place stays.
  proc.wait()
  saved = sorted(f for f in os.listdir(band_dir) if f.endswith(".npz"))
  assert len(saved) >= 2 and not (out / "a" / "report.json").exists()
  assert all(f.startswith("band_") or f == "key.json" for f in os.listdir(band_dir))
  again = TruthWindows(truth)
  report = slides.process_slide(path, model_of(again), settings(), str(out), progress=False)
  assert report["windows_detected_now"] == report["windows"] - 64 * len(saved)
  assert report["figures"] == len(truth.figures)


@pytest.fixture(scope="module")
def run_dir(plan_runs):
  return plan_runs / "all_domains" / "fold0"


def test_end_to_end_with_a_trained_run(run_dir, tmp_path, capsys):
  """The command on a tiny SVS and a 0.5 µm/px TIFF with the session's trained run."""
  paths = []
  for name, spec in (("c.svs", synthetic_slides.SlideSpec(512, 384, seed=6, islands=1)),
                     ("d.tif", synthetic_slides.SlideSpec(256, 192, um_per_px=0.5, seed=7,
                                                          islands=1))):
    paths.append(str(tmp_path / name))
    synthetic_slides.write_slide(paths[-1], spec, "svs" if name.endswith("svs") else "tiff")
  # The tiny run scores everything near 0.02: count at its noise level, to have counts.
  args = ["--model", str(run_dir), "--slides", *paths, "--out", str(tmp_path / "out"),
          "--threshold", "0.0", "--min-score", "0.0", "--hotspot-mm2", "0.01"]
  assert slides_cli.main(args) == 0
  out = capsys.readouterr().out
  summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
  assert [r["slide"] for r in summary] == ["c.svs", "d.tif"]
  for row in summary:
    stem = os.path.splitext(row["slide"])[0]
    report = json.loads((tmp_path / "out" / stem / "report.json").read_text())
    assert report["figures"] > 0 and int(row["figures"]) == report["figures"]
    assert report["model"]["step"] > 0 and row["slide"] in out
    assert 0 < report["hotspot"]["figures"] <= report["figures"]
    found = predictions.read_predictions(tmp_path / "out" / stem / "detections.json")
    assert len(found[row["slide"]].xy) == report["detections"] >= report["figures"]
  assert json.loads((tmp_path / "out" / "d" / "report.json").read_text())["resampled"]


def test_two_models_count_as_their_fused_slide_detections(plan_runs, tmp_path):
  """`slides --model A --model B` (one jitted call for both) gives what A's and B's own
  slide detections give fused: the same windows, suppression and fusion."""
  path = str(tmp_path / "e.svs")
  synthetic_slides.write_slide(path, synthetic_slides.SlideSpec(512, 384, seed=8, islands=1),
                               "svs")
  folds = [str(plan_runs / "all_domains" / f"fold{k}") for k in (0, 1)]
  common = ["--slides", path, "--threshold", "0.0", "--min-score", "0.0",
            "--hotspot-mm2", "0.01"]
  found = {}
  for name, models in (("a", folds[:1]), ("b", folds[1:]), ("ab", folds)):
    args = [a for m in models for a in ("--model", m)] + common + ["--out", str(tmp_path / name)]
    assert slides_cli.main(args) == 0
    found[name] = predictions.read_predictions(tmp_path / name / "e" / "detections.json",
                                               {"e.svs": 0.25})["e.svs"]
  xy, scores = ensemble.fuse([found["a"].xy, found["b"].xy], [found["a"].scores,
                                                             found["b"].scores])
  order = lambda xy, s: np.lexsort((xy[:, 0], s))  # noqa: E731  Ties in any order.
  got, want = order(found["ab"].xy, found["ab"].scores), order(xy, scores)
  assert len(found["ab"].scores) == len(scores) > 0
  np.testing.assert_allclose(found["ab"].scores[got], scores[want], atol=1e-6)
  np.testing.assert_allclose(found["ab"].xy[got], xy[want], atol=1e-3)
  report = json.loads((tmp_path / "ab" / "e" / "report.json").read_text())
  assert [m["workdir"] for m in report["model"]["members"]] == folds


def test_command_line_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    slides_cli.main(["--model", "a", "--slides", "d1/x.svs", "d2/x.ndpi", "--out", str(tmp_path)])
  assert "share the output folder x/" in capsys.readouterr().err
  assert slides_cli.main(["--model", str(tmp_path), "--slides", "x.svs", "--out",
                          str(tmp_path)]) == 2
  assert "not a training run" in capsys.readouterr().err
