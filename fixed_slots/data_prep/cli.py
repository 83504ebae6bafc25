"""Command line: build the TFDS (array_record) datasets from local copies of their official files.

    python -m fixed_slots.data_prep build NAME --source=DIR [--data_dir=DIR] [--max_examples N]
                                   [--split_name S] [--overwrite]
    python -m fixed_slots.data_prep list

NAME is one of clevr_mirror, shapestacks, coco, clevr_with_masks; --source is the dataset's
official layout on local disk (see `list`), --data_dir the TFDS root that training reads through
`config.data.data_dir`; both default to TFDS's convention: $TFDS_DATA_DIR, else
~/tensorflow_datasets. Nothing is downloaded and TensorFlow is not needed.

Every image and mask is decoded while building; a missing, malformed or corrupt file stops the
build with one line naming it and exit status 2 (nothing is left half-built: TFDS writes into a
temporary directory and renames it when done).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

from fixed_slots.data_prep.builders import BUILDERS, builder_class, builder_module
from fixed_slots.data.sources import default_data_dir
from fixed_slots.errors import DataError


def build(
    name: str,
    source: str,
    data_dir: str | None = None,
    *,
    max_examples: int | None = None,
    split_name: str | None = None,
    overwrite: bool = False,
) -> str:
    """Build dataset `name` from `source` into `data_dir`; returns the dataset's version dir.

    `data_dir` None means TFDS's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets), the
    directory training reads when config.data.data_dir is unset. Raises SourceLayoutError
    (naming the missing or malformed file) before writing anything when `source` does not have
    the expected layout, and BadImageError (naming the file) when an image cannot be decoded;
    a failed build leaves `data_dir` as it found it (with --overwrite, the old build is put back).
    """
    module = builder_module(name)
    source = os.path.abspath(os.path.expanduser(source))
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    kwargs = {}
    if split_name is not None:
        if name != "shapestacks":
            raise ValueError("--split_name only applies to shapestacks")
        kwargs["split_name"] = split_name
    module.validate_source(source, **kwargs)  # fail fast, before TFDS creates directories
    # What a failed build must not leave behind: the directories it created (TFDS removes its
    # own incomplete.* directory, not data_dir/, data_dir/NAME/ or data_dir/downloads/).
    created = [p for p in (data_dir, os.path.join(data_dir, name),
                           os.path.join(data_dir, "downloads")) if not os.path.exists(p)]
    try:
        return _prepare(name, data_dir, source, kwargs, max_examples, overwrite)
    except BaseException:
        _remove_empty_dirs(created)
        raise


def _remove_empty_dirs(paths: list[str]) -> None:
    """Removes each of `paths` that holds nothing but empty directories (deepest first)."""
    for path in sorted(paths, key=len, reverse=True):
        if not os.path.isdir(path):
            continue
        for top, _, _ in sorted(os.walk(path), key=lambda t: len(t[0]), reverse=True):
            try:
                os.rmdir(top)  # fails on anything that is not an empty directory: kept
            except OSError:
                pass


def _prepare(name: str, data_dir: str, source: str, kwargs: dict, max_examples: int | None,
             overwrite: bool) -> str:
    builder = builder_class(name)(data_dir=data_dir, file_format="array_record", **kwargs)
    out_dir = os.fspath(builder.data_dir)
    if os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        if not overwrite:
            print(f"{name} already built at {out_dir}; pass --overwrite to rebuild it")
            return out_dir
        # Kept aside until the new build is complete: a failed rebuild puts it back.
        previous = out_dir.rstrip(os.sep) + ".previous"
        if os.path.exists(previous):
            shutil.rmtree(previous)
        os.rename(out_dir, previous)
        try:
            _download_and_prepare(name, data_dir, source, kwargs, max_examples)
        except BaseException:
            if os.path.isdir(out_dir):
                shutil.rmtree(out_dir)
            os.rename(previous, out_dir)
            raise
        shutil.rmtree(previous)
        return out_dir
    _download_and_prepare(name, data_dir, source, kwargs, max_examples)
    return out_dir


def _download_and_prepare(name: str, data_dir: str, source: str, kwargs: dict,
                          max_examples: int | None) -> None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = builder_class(name)(data_dir=data_dir, file_format="array_record", **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=source,
            try_download_gcs=False,  # never fetch prepared data from Google's bucket
            max_examples_per_split=max_examples,
        )
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fixed_slots.data_prep",
        description="Build TFDS array_record datasets from local copies of the official files.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build one dataset")
    b.add_argument("name", choices=sorted(BUILDERS))
    b.add_argument("--source", required=True, help="local copy in the official layout")
    b.add_argument(
        "--data_dir", default=None,
        help="TFDS root to write to (config.data.data_dir); default $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets",
    )
    b.add_argument("--max_examples", type=_positive_int, default=None,
                   help="cap per split (for tests)")
    b.add_argument("--split_name", default=None, help="shapestacks: folder under splits/")
    b.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    commands.add_parser("list", help="list the datasets and their expected source layouts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a bad source layout or file)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(BUILDERS):
            print(f"{name}: {builder_module(name).LAYOUT}")
        return 0
    if args.split_name is not None and args.name != "shapestacks":
        parser.error("--split_name only applies to shapestacks")  # exits with status 2
    try:
        out_dir = build(
            args.name,
            args.source,
            args.data_dir,
            max_examples=args.max_examples,
            split_name=args.split_name,
            overwrite=args.overwrite,
        )
    except DataError as e:  # the user's files: one plain line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {args.name} at {out_dir}")
    return 0
