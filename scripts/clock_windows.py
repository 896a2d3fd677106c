"""A training run's step times beside the GPU's clocks, power and temperature, window by window:
whether a long run's slower steps come with lower clocks (docs/performance.md, runs 130, 133 and
136; gpu_check.sh's `clocks` stage).

python scripts/clock_windows.py RUN_FOLDER SMI_CSV [STEPS_PER_WINDOW]

RUN_FOLDER: a TensorBoard folder under runs/ (perf/step_ms, logged every step). SMI_CSV: the log of
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,
        clocks_event_reasons.active --format=csv,noheader,nounits -lms 250
whose first line is `# epoch <seconds>` written just before it starts: nvidia-smi's timestamps are
the host's local time, so that line gives the offset to TensorBoard's wall times.
"""
import statistics
import sys
from datetime import datetime

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_smi(path: str) -> list[tuple[float, float, float, float, float, int]]:
    """(epoch seconds, SM MHz, memory MHz, watts, °C, clock-event reasons) per sample."""
    rows, offset, start = [], None, None
    with open(path) as f:
        for line in f:
            if line.startswith("# epoch"):
                start = float(line.split()[2])
                continue
            cells = [c.strip() for c in line.split(",")]
            if len(cells) < 6:
                continue
            try:
                local = datetime.strptime(cells[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                values = [float(c) for c in cells[1:5]]
                reasons = int(cells[5], 16)
            except ValueError:  # a header, or "[N/A]"
                continue
            if offset is None:
                if start is None:
                    raise ValueError(f"{path}: no '# epoch <seconds>' line before the first sample")
                offset = start - local  # the first sample comes within ~0.25 s of the epoch line
            rows.append((local + offset, *values, reasons))
    return rows


def windows(steps, smi, per: int = 50) -> list[dict]:
    """Per window of steps (from the 4th step, the first ones compile, to multiples of `per`): its
    steps, median step time, and the GPU samples taken from the previous step's end to its last
    step's end (mean and range of the SM clock, mean memory clock, mean and peak power, peak
    temperature, the clock-event reasons seen). steps: TensorBoard scalar events (step, value in
    ms, wall_time); smi: read_smi's rows."""
    rows = []
    for i in [3, *range(per, len(steps), per)]:
        window = steps[i:i + per - (i % per)]
        t0, t1 = steps[i - 1].wall_time, window[-1].wall_time
        inside = [s for s in smi if t0 <= s[0] <= t1]
        row = {"first": window[0].step, "last": window[-1].step,
               "median_ms": statistics.median(e.value for e in window), "samples": len(inside)}
        if inside:
            sm = [s[1] for s in inside]
            reasons = 0
            for s in inside:
                reasons |= s[5]
            row.update(sm_mhz=statistics.mean(sm), sm_min=min(sm), sm_max=max(sm),
                       mem_mhz=statistics.mean(s[2] for s in inside), watts=statistics.mean(s[3] for s in inside),
                       watts_max=max(s[3] for s in inside), temp_max=max(s[4] for s in inside), reasons=reasons)
        rows.append(row)
    return rows


def main():
    run, smi_csv, *rest = sys.argv[1:]
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    steps = acc.Scalars("perf/step_ms")
    smi = read_smi(smi_csv)
    print(f"{run}: {len(steps)} steps, {len(smi)} GPU samples")
    print("steps      median ms   SM MHz (min-max)   mem MHz   W (mean/max)   °C max   reasons")
    for r in windows(steps, smi, int(rest[0]) if rest else 50):
        head = f"{r['first']:5d}-{r['last']:<5d} {r['median_ms']:8.2f}   "
        if not r["samples"]:
            print(head + "no samples")
            continue
        print(head + f"{r['sm_mhz']:6.0f} ({r['sm_min']:.0f}-{r['sm_max']:.0f})   {r['mem_mhz']:6.0f}   "
              f"{r['watts']:5.0f} / {r['watts_max']:3.0f}      {r['temp_max']:3.0f}     {r['reasons']:#x}")


if __name__ == "__main__":
    main()
