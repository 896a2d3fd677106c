"""The last value of TensorBoard scalars in each run folder under a root: compare runs' losses
without opening TensorBoard (e.g. gpu_check.sh's `variants` runs).

python scripts/tb_last.py ROOT [TAG ...]   (default tags: train/loss val/loss)
"""
import glob
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    root, tags = sys.argv[1], sys.argv[2:] or ["train/loss", "val/loss"]
    for folder in sorted({os.path.dirname(p) for p in glob.glob(f"{root}/**/events.out.tfevents.*", recursive=True)}):
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        found = set(acc.Tags()["scalars"])
        cells = [f"{t} {acc.Scalars(t)[-1].value:.4f} (step {acc.Scalars(t)[-1].step})" for t in tags if t in found]
        print(f"{os.path.relpath(folder, root)}: {', '.join(cells) or 'none of ' + ' '.join(tags)}")


if __name__ == "__main__":
    main()
