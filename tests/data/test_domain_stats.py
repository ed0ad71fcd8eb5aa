import json

from midog_jax import domains
from midog_jax import stats
from midog_jax.data import annotations
from midog_jax.data import domain_stats
from tests.helpers import REAL_CSV, REAL_JSON, needs_real_files

# The paper's Table 2: cases, MF sum, MF median, non-MF sum, non-MF median.
# Non-MF sums of domains 2 and 5 are those of the file (one fewer than printed).
TABLE_2 = {
    "1a": (50, 451, 5.5, 724, 12.0), "1b": (50, 582, 6.0, 1066, 14.0),
    "1c": (50, 688, 7.5, 924, 13.5), "2": (44, 855, 15.5, 951, 20.5),
    "3": (55, 3959, 66.0, 4257, 74.0), "4": (50, 2327, 14.5, 1366, 15.0),
    "5": (55, 639, 4.0, 1761, 22.0), "6a": (85, 1097, 9.0, 2072, 17.0),
    "6b": (15, 189, 7.0, 303, 14.0), "7": (49, 1150, 11.0, 925, 12.0),
}


@needs_real_files
def test_reproduces_tables_1_and_2(capsys):
  assert stats.main(["--annotations", str(REAL_JSON), "--splits", str(REAL_CSV), "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [r["domain"] for r in rows] == list(TABLE_2)
  for r in rows:
    assert set(r) == set(domain_stats.COLUMNS)
    assert (r["cases"], r["mitotic_figures"], r["mitotic_figures_median"],
            r["non_mitotic_figures"], r["non_mitotic_figures_median"]) == TABLE_2[r["domain"]]
    assert r["train_cases"] + r["test_cases"] == r["cases"]
    d = domains.domain(r["domain"])  # Table 1: tumour type and scanner.
    assert (r["tumor_type"], r["scanner"]) == (d.tumor.slug, d.scanner.name)
  assert sum(r["train_cases"] for r in rows) == 392
  assert sum(r["test_cases"] for r in rows) == 111


@needs_real_files
def test_table_output(capsys):
  assert stats.main(["--annotations", str(REAL_JSON), "--splits", str(REAL_CSV)]) == 0
  out = capsys.readouterr().out
  assert "lymphosarcoma (canine)" in out and "3,959" in out and "11,937" in out


def test_bad_input_is_a_clean_error(tmp_path, capsys):
  code = stats.main(["--annotations", str(tmp_path / "x.json"), "--splits", str(tmp_path / "y.csv")])
  assert code == 2
  assert "split file not found" in capsys.readouterr().err


def test_table_of_synthetic_counts(tmp_path):
  from midog_jax.data import synthetic
  cases = synthetic.write_dataset(str(tmp_path), 2, 128, 96, seed=1, density_scale=200,
                                  progress=False)
  rows = domain_stats.domain_table(annotations.load_cases(tmp_path / "MIDOG++.json",
                                                   tmp_path / "datasets_xvalidation.csv"))
  assert sum(r["mitotic_figures"] for r in rows) == sum(len(c.mitotic_figures) for c in cases)
  assert all(r["cases"] == 2 for r in rows)


def test_the_lab_tells_domains_6a_and_6b_apart():
  rows = {r["domain"]: r for r in domain_stats.domain_table([])}
  a, b = rows["6a"], rows["6b"]
  assert (a["tumor_type"], a["scanner"]) == (b["tumor_type"], b["scanner"])
  assert (a["lab"], b["lab"]) == ("AMC New York", "VMU Vienna")
  lines = domain_stats.format_table(list(rows.values())).splitlines()
  assert lines[0].split()[:5] == ["domain", "tumour", "type", "scanner", "lab"]
  row_6a = next(l for l in lines if l.startswith("6a "))
  row_6b = next(l for l in lines if l.startswith("6b "))
  assert "AMC New York" in row_6a and "VMU Vienna" in row_6b
