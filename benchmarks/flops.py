"""FLOPs from XLA's cost analysis and model FLOP utilisation (MFU).

XLA counts the floating-point operations of the compiled program (a multiply
and an add are 2). For a program partitioned over several devices, the count
is that of one device's program, so the total is the count times the number
of devices. MFU = achieved FLOP/s / (peak FLOP/s per device x devices).

Peak bf16 dense matrix throughput per device, from the vendors' data sheets
(NVIDIA lists bf16 "with sparsity": dense is half of that figure):
  H100 SXM and H200 (SXM): 989 TFLOP/s (NVIDIA H100 and H200 data sheets);
  H100 PCIe: 756 TFLOP/s; A100: 312 TFLOP/s (NVIDIA A100 data sheet);
  TPU v4: 275, v5e: 197, v5p: 459, v6e: 918 TFLOP/s (Google Cloud TPU docs).
Only bfloat16 has a table entry; for other dtypes (or other devices) pass
the peak explicitly (`--peak-tflops`).
"""

from __future__ import annotations

# (substring of `device.device_kind`, peak bf16 dense TFLOP/s); first match wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part.
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6", 918.0),
)


def compiled_flops(jitted, *args, n_devices: int = 1) -> float | None:
  """FLOPs of one call of `jitted(*args)` over its `n_devices` (None if unknown).

  Lowers and compiles again (the compilation cache makes that cheap when the
  function already ran).
  """
  try:
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
  except Exception:  # Some backends have no cost model.
    return None
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"]) * n_devices


def peak_tflops(device_kind: str, dtype: str,
                override: float | None = None) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, where the figure comes from)."""
  if override:
    return override, "--peak-tflops"
  if dtype == "bfloat16":
    for key, value in BF16_PEAK_TFLOPS:
      if key.lower() in device_kind.lower():
        return value, f"table: {key} bf16 dense"
  return None, f"no peak known for {device_kind!r} in {dtype}"


def utilisation(flops_per_item: float | None, items_per_second: float,
                n_devices: int, peak: float | None) -> float | None:
  """Model FLOP utilisation in [0, 1] (None without FLOPs or peak)."""
  if not flops_per_item or not peak:
    return None
  return flops_per_item * items_per_second / (peak * 1e12 * n_devices)


def report(label: str, flops_per_item: float | None, items_per_second: float,
           devices: list, dtype: str, peak_override: float | None,
           unit: str = "image") -> dict:
  """Prints and returns FLOPs per item, achieved TFLOP/s, MFU, per-device rate."""
  n = len(devices)
  peak, source = peak_tflops(devices[0].device_kind, dtype, peak_override)
  mfu = utilisation(flops_per_item, items_per_second, n, peak)
  out = {"flops_per_" + unit: flops_per_item, "per_device": items_per_second / n,
         "peak_tflops": peak, "peak_source": source, "mfu": mfu}
  gflops = f"{flops_per_item / 1e9:.2f} GFLOP/{unit}" if flops_per_item else "FLOPs unknown"
  achieved = (f", {flops_per_item * items_per_second / 1e12:.2f} TFLOP/s"
              if flops_per_item else "")
  mfu_text = f", MFU {100 * mfu:.1f} % of {peak:g} TFLOP/s x {n}" if mfu is not None else (
      f", MFU n/a ({source})")
  print(f"{label} cost: {gflops}{achieved}{mfu_text}; "
        f"{items_per_second / n:,.1f} {unit}s/s per device ({n} x {devices[0].device_kind})")
  return out
