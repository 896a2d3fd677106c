"""The last TensorBoard scalars of every run folder under a root, to compare runs without TensorBoard.

With --series, every logged value of each tag (step:value), e.g. two runs' validation losses side
by side. `python scripts/tb_last.py --help` for the options.
"""
import argparse
import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="a folder holding run folders, e.g. runs/")
    p.add_argument("tags", nargs="*", default=["train/loss", "val/loss"], help="scalar tags (default: train/loss val/loss)")
    p.add_argument("--series", action="store_true", help="every logged value, not only the last")
    args = p.parse_intermixed_args(argv)  # --series may come between the root and the tags
    root, tags, series = args.root, args.tags, args.series
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
