"""Data for the examples and benchmarks: Fashion-MNIST, CIFAR-10 and a character-level corpus.

Nothing here needs a network except the optional Fashion-MNIST download; every loader
raises :class:`FileNotFoundError` naming the places it searched and how to provide the data.

Fashion-MNIST (IDX files, gzip or raw)
--------------------------------------

The data is looked up, in order, in

1. the ``data_dir`` argument, when given;
2. the directory named by the environment variable ``EVA_OPTAX_DATA``;
3. ``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``);
4. the cache directory ``~/.cache/eva_optax/fashion-mnist``.

When none of them holds the files, they are downloaded from the official Fashion-MNIST
location into the cache directory (short timeout; this only works where a network exists).
If that fails too, :class:`FileNotFoundError` explains how to provide the data.

Each file may be stored gzip-compressed (``train-images-idx3-ubyte.gz``) or raw
(``train-images-idx3-ubyte``).

CIFAR-10 (the python pickle archive)
------------------------------------
:func:`cifar10` reads the official ``cifar-10-python.tar.gz`` (directly, without extracting
it) or its extracted ``cifar-10-batches-py/`` directory, looked up in the ``data_dir``
argument, then in ``$EVA_OPTAX_CIFAR10``, then in ``~/.cache/eva_optax/cifar10``. It is never
downloaded. The batches are pickles: only load archives you trust.

Character-level text corpus
---------------------------
:func:`text_corpus` reads a text file or a directory of them (``path`` argument, else
``$EVA_OPTAX_CORPUS``), by default the fortune cookies of the Debian package ``fortunes``
(``/usr/share/games/fortunes``). :func:`char_vocabulary`, :func:`encode`, :func:`decode`,
:func:`split_text` and :func:`sequence_batches` turn it into next-character training data.

Modules: :mod:`.fashion_mnist_files`, :mod:`.cifar10_files`, :mod:`.text`, :mod:`.batching`
(:func:`batches`, :func:`holdout`) and :mod:`.check` (the command line); their public names
are importable from here.

Command line
------------
From the repository root, ``python -m examples.harness.datasets --check`` prints where
Fashion-MNIST was found and exits with status 1 (and the explanation) when it was not;
``--check-cifar10`` and ``--check-corpus`` do the same for CIFAR-10 and the text corpus.
"""

from __future__ import annotations

from examples.harness.datasets.fashion_mnist_files import (
  ENV_VAR as ENV_VAR,
  SYSTEM_DIR as SYSTEM_DIR,
  DEBIAN_PACKAGE as DEBIAN_PACKAGE,
  fashion_mnist as fashion_mnist,
  find_fashion_mnist as find_fashion_mnist,
  read_idx as read_idx,
  cache_dir as cache_dir,
  BASE_URL as BASE_URL,
  DOWNLOAD_TIMEOUT_S as DOWNLOAD_TIMEOUT_S,
  Split as Split,
)
from examples.harness.datasets.batching import (
  batches as batches,
  holdout as holdout,
  HOLDOUT_SEED as HOLDOUT_SEED,
)
from examples.harness.datasets.cifar10_files import (
  CIFAR10_ENV_VAR as CIFAR10_ENV_VAR,
  CIFAR10_URL as CIFAR10_URL,
  CIFAR10_CLASSES as CIFAR10_CLASSES,
  cifar10 as cifar10,
  find_cifar10 as find_cifar10,
  cifar10_cache_dir as cifar10_cache_dir,
  CIFAR10_ARCHIVE as CIFAR10_ARCHIVE,
  CIFAR10_SUBDIR as CIFAR10_SUBDIR,
)
from examples.harness.datasets.text import (
  CORPUS_ENV_VAR as CORPUS_ENV_VAR,
  FORTUNES_DIR as FORTUNES_DIR,
  FORTUNES_PACKAGE as FORTUNES_PACKAGE,
  text_corpus as text_corpus,
  char_vocabulary as char_vocabulary,
  encode as encode,
  decode as decode,
  split_text as split_text,
  sequence_batches as sequence_batches,
  sequence_batches_per_epoch as sequence_batches_per_epoch,
)

__all__ = [
  "ENV_VAR",
  "SYSTEM_DIR",
  "DEBIAN_PACKAGE",
  "fashion_mnist",
  "find_fashion_mnist",
  "batches",
  "read_idx",
  "CIFAR10_ENV_VAR",
  "CIFAR10_URL",
  "CIFAR10_CLASSES",
  "cifar10",
  "find_cifar10",
  "cifar10_cache_dir",
  "CORPUS_ENV_VAR",
  "FORTUNES_DIR",
  "FORTUNES_PACKAGE",
  "text_corpus",
  "char_vocabulary",
  "encode",
  "decode",
  "split_text",
  "sequence_batches",
  "sequence_batches_per_epoch",
]
