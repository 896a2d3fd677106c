"""The last value of TensorBoard scalars in each run folder under a root: compare runs' losses
without opening TensorBoard (e.g. gpu_check.sh's `variants` runs). With --series, every logged
value of each tag (step:value), e.g. the validation losses of two runs side by side.

python scripts/tb_last.py ROOT [--series] [TAG ...]   (default tags: train/loss val/loss)
"""
import glob
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    args = sys.argv[1:]
    series = "--series" in args
    root, *tags = [a for a in args if a != "--series"]
    tags = tags or ["train/loss", "val/loss"]
    for folder in sorted({os.path.dirname(p) for p in glob.glob(f"{root}/**/events.out.tfevents.*", recursive=True)}):
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        found = [t for t in tags if t in set(acc.Tags()["scalars"])]
        name = os.path.relpath(folder, root)
        if series:
            for t in found:
                print(f"{name} {t}: " + " ".join(f"{e.step}:{e.value:.4f}" for e in acc.Scalars(t)))
            continue
        cells = [f"{t} {acc.Scalars(t)[-1].value:.4f} (step {acc.Scalars(t)[-1].step})" for t in found]
        print(f"{name}: {', '.join(cells) or 'none of ' + ' '.join(tags)}")


if __name__ == "__main__":
    main()
