"""Resuming a run: which file `--ckpt_path last` means, and which settings a checkpoint decides.

What defines the model (the variant, its layout, the widths, the vocabulary) comes from the
checkpoint: a setting left at its default takes the checkpoint's value, and one set to another
value is an error naming both. The data settings left at their defaults take the checkpoint's
too, so a run resumed (or validated) without its config reads the same data. Everything else
(learning rate and schedule, skip_nonfinite, checkpointing, compile, precision, logging,
max_steps) is this command's.
"""
from __future__ import annotations

import glob
import os

from .attention import resolve

# The model's hyper-parameters that its weights were trained for.
ARCHITECTURE = ("attention", "segment_lengths", "dilation_rates", "head_split", "vocab_size", "d_model", "n_layers",
                "n_heads", "mlp_hidden", "rope_base")


def find_last(patterns: list[str]) -> str | None:
    """The newest last*.ckpt (by modification time) in the folders matching `patterns`."""
    found = [p for pattern in patterns for p in glob.glob(os.path.join(pattern, "last*.ckpt"))
             if not os.path.basename(p).startswith(".")]
    return max(found, key=lambda p: (os.path.getmtime(p), p)) if found else None


def version_of(path: str) -> int | None:
    """N when `path` is <save_dir>/<name>/version_N/checkpoints/<file>, else None."""
    folder = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    number = folder.removeprefix("version_")
    return int(number) if folder.startswith("version_") and number.isdigit() else None


def _plain(value):
    """Lists for tuples (YAML gives lists, a checkpoint may hold tuples), recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _canonical(key: str, value):
    if key == "attention":  # a registry name and a class path of one variant are the same setting
        value = dict(value or {})
        return resolve(value.get("class_path", "improved_dilated")).name, _plain(
            dict(value.get("init_args") or {}))
    return _plain(value)


def differences(model: dict, saved: dict) -> list[str]:
    """The architecture settings in which `model` and the checkpoint's `saved` differ."""
    return [k for k in ARCHITECTURE if k in saved and _canonical(k, model.get(k)) != _canonical(k, saved[k])]


def _conflict(path: str, conflicts: list[str]) -> ValueError:
    return ValueError(f"resuming from {path}: the model's shape comes from the checkpoint, and {'; '.join(conflicts)}. "
                      "Drop those settings (or give the checkpoint's), or train a new model without --ckpt_path")


def take_architecture(model: dict, saved: dict, defaults: dict, path: str) -> list[str]:
    """Fill `model` (the parsed model settings, changed in place) with the checkpoint's
    architecture from `saved` (its hyper-parameters) where a setting was left at its default
    (the attention: not given); the settings so taken, for a notice. ValueError listing every
    setting given another value than the checkpoint's."""
    taken, conflicts = [], []
    for key in differences(model, saved):
        if key == "attention":  # its default is None: any value given is a choice
            unset = model.get(key) is None
        else:
            unset = _canonical(key, model.get(key)) == _canonical(key, defaults.get(key))
        if unset:
            model[key] = saved[key]
            taken.append(f"model.{key}={saved[key]!r}")
        else:
            conflicts.append(f"model.{key}={model.get(key)!r} but the checkpoint has {saved[key]!r}")
    if conflicts:
        raise _conflict(path, conflicts)
    return taken


def check_architecture(model: dict, saved: dict, path: str) -> None:
    """ValueError unless the model's architecture settings are the checkpoint's."""
    conflicts = [f"model.{k}={model.get(k)!r} but the checkpoint has {saved[k]!r}" for k in differences(model, saved)]
    if conflicts:
        raise _conflict(path, conflicts)


# Data settings of the machine, not of the run: never taken from a checkpoint.
MACHINE = ("num_workers",)


def take_unset(settings: dict, saved: dict, defaults: dict, section: str) -> list[str]:
    """Fill the settings left at their defaults in `settings` (changed in place) with the
    checkpoint's `saved` values; the settings so taken, for a notice."""
    taken = []
    for key, kept in saved.items():
        if key in MACHINE or key not in defaults or _plain(settings.get(key)) == _plain(kept):
            continue
        if _plain(settings.get(key)) == _plain(defaults[key]):
            settings[key] = kept
            taken.append(f"{section}.{key}={kept!r}")
    return taken
