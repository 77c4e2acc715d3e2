"""``python -m examples.harness.datasets``: where Fashion-MNIST, CIFAR-10 and the text corpus
were found (``--check``, ``--check-cifar10``, ``--check-corpus``; status 1 when missing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from examples.harness.datasets.cifar10_files import find_cifar10
from examples.harness.datasets.fashion_mnist_files import find_fashion_mnist
from examples.harness.datasets.text import text_corpus


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m examples.harness.datasets",
    description="Locate Fashion-MNIST, CIFAR-10 and the text corpus.",
  )
  parser.add_argument(
    "--check",
    action="store_true",
    help="report where Fashion-MNIST is; exit 1 if missing",
  )
  parser.add_argument(
    "--check-cifar10",
    action="store_true",
    help="report where CIFAR-10 is; exit 1 if missing",
  )
  parser.add_argument(
    "--check-corpus",
    action="store_true",
    help="load the text corpus and describe it; exit 1 if missing",
  )
  parser.add_argument("--data-dir", default=None, help="a directory to look in first")
  parser.add_argument(
    "--corpus", default=None, help="a text file or directory (for --check-corpus)"
  )
  parser.add_argument(
    "--no-download", action="store_true", help="do not try to download missing files"
  )
  args = parser.parse_args(argv)
  if not (args.check or args.check_cifar10 or args.check_corpus):
    parser.print_help()
    return 0
  status = 0
  try:
    if args.check:
      for split in ("train", "test"):
        images, labels = find_fashion_mnist(split, args.data_dir, download=not args.no_download)
        print(f"Fashion-MNIST {split}: {images} {labels}")
  except FileNotFoundError as exc:
    print(exc, file=sys.stderr)
    status = 1
  try:
    if args.check_cifar10:
      for split in ("train", "test"):
        print(f"CIFAR-10 {split}: {find_cifar10(split, args.data_dir)}")
  except FileNotFoundError as exc:
    print(exc, file=sys.stderr)
    status = 1
  try:
    if args.check_corpus:
      print(f"Text corpus: {text_corpus(args.corpus)[1]}")
  except (FileNotFoundError, ValueError) as exc:
    print(exc, file=sys.stderr)
    status = 1
  return status
