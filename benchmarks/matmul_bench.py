"""Native CPU matmul speed per weight format (bf16, int8, int4) against the machine's read bandwidth.

For each weight shape and row count M, every format is timed in interleaved rounds (the shared VM's bandwidth
moves 15-26 GB/s within minutes) and the median is kept; weights are cycled through enough copies (>= 256 MB) that
every call streams from memory, not from the last-level cache. GB/s = bytes of the packed weight (scales and zero
points included) per second; `% bw` = that over the read bandwidth (sum over a 1 GiB tensor, best of 3) measured
right before and after; `x bf16` = the format's speed over bf16's in the same run (time per call).

  python benchmarks/matmul_bench.py [--shapes 6144x1024 32768x1024] [--rows 1 2 16 512] [--rounds 5]
      [--formats bf16 int8 int8-q8in ...]   (-q8in: inputs rounded to int8, linear(..., quantize_inputs=True))
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch

from qwen35.backends.cpu.weights import PackedWeight, _matmul, _matmul_q8in
from qwen35.quant import quantize

FORMATS = {"bf16": lambda w: w.bfloat16(), "int8": lambda w: quantize(w, 8, 128),
           "int4": lambda w: quantize(w, 4, 128), "int4-g32": lambda w: quantize(w, 4, 32)}
# "<format>-q8in": the same weight with the inputs rounded to int8 (linear(..., quantize_inputs=True))
FORMATS.update({f"{f}-q8in": FORMATS[f] for f in ("int8", "int4", "int4-g32")})


def bandwidth() -> float:
    """GB/s of a sum over 1 GiB, best of 3."""
    t = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def clone(p: PackedWeight) -> PackedWeight:
    out = p[None][0]  # a view; then its own storage
    out.data = p.data.clone()
    out.scales = None if p.scales is None else p.scales.clone()
    out.zeros = None if p.zeros is None else p.zeros.clone()
    return out


def timed(copies: list[PackedWeight], x: torch.Tensor, y: torch.Tensor, calls: int, q8in: bool = False) -> float:
    fn = _matmul_q8in() if q8in else _matmul()
    faces = [ctypes.byref(c.face) for c in copies]
    fn(x.data_ptr(), faces[0], 0, y.data_ptr(), x.shape[0])  # warm-up
    t0 = time.perf_counter()
    for i in range(calls):
        fn(x.data_ptr(), faces[i % len(faces)], 0, y.data_ptr(), x.shape[0])
    return (time.perf_counter() - t0) / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["6144x1024", "32768x1024"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 16, 512])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    print("| shape | M | format | ms/call | GB/s | % bw | x bf16 |\n|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        w = torch.randn(n, k)
        packed = {f: PackedWeight.pack(FORMATS[f](w)) for f in args.formats if not f.endswith("-q8in")}
        packed.update({f: packed.get(f[:-5]) or PackedWeight.pack(FORMATS[f](w)) for f in args.formats
                       if f.endswith("-q8in")})
        copies = {f: [p] + [clone(p) for _ in range(-(-(256 << 20) // p.nbytes) - 1)] for f, p in packed.items()
                  if not f.endswith("-q8in") or f[:-5] not in packed}
        copies.update({f: copies[f[:-5]] for f in packed if f not in copies})
        for M in args.rows:
            x, y = torch.randn(M, k), torch.empty(M, n)
            calls = max(2, int(2e8 // (packed["bf16"].nbytes if "bf16" in packed else n * k * 2) // max(1, M // 16)))
            bw_before = bandwidth()
            times = {f: [] for f in args.formats}
            for _ in range(args.rounds):
                for f in args.formats:
                    times[f].append(timed(copies[f], x, y, calls, f.endswith("-q8in")))
            bw = (bw_before + bandwidth()) / 2
            for f in args.formats:
                t = statistics.median(times[f])
                gbs = packed[f].nbytes / t / 1e9
                rel = statistics.median(times["bf16"]) / t if "bf16" in times else float("nan")
                print(f"| {shape} | {M} | {f} | {t * 1e3:.3f} | {gbs:.1f} | {gbs / bw:.0%} | {rel:.2f} |")
                results.append(dict(shape=shape, M=M, format=f, seconds=t, gbps=gbs, bandwidth=bw, vs_bf16=rel))
            print(f"| {shape} | {M} | (read bandwidth) | | {bw:.1f} | | |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
