"""The corpus of the LM example: the Python standard library's own source, split by file.

Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except the directories
``site-packages``, ``test``, ``tests``, ``idle_test`` and ``__pycache__`` (the test suites are
large and repetitive). Split: a file is held out when the first 8 bytes of the SHA-256 of its
path relative to the stdlib root, read as a big-endian integer, are 0 modulo 10 (about 10 %
of the files; the same on every machine with the same Python version). Segment ``file_kind``:
``codec`` (``encodings/*``: mostly generated charmap tables), ``package`` (any other file
inside a package directory) or ``module`` (a top-level module such as ``os.py``).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
HELDOUT_MOD = 10
EOT = "<|endoftext|>"
FILE_KINDS = ("module", "package", "codec")


def source_files(root: Path = STDLIB) -> list[str]:
    """Relative paths (posix, sorted) of the corpus files under root."""
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            out.append(rel.as_posix())
    return sorted(out)


def is_heldout(rel: str) -> bool:
    """The deterministic file-level split: SHA-256 of the relative path, first 8 bytes mod 10 == 0."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") % HELDOUT_MOD == 0


def file_kind(rel: str) -> str:
    """Coarse category of a corpus file: codec / package / module (see the module docstring)."""
    parts = rel.split("/")
    if parts[0] == "encodings":
        return "codec"
    return "package" if len(parts) > 1 else "module"


def read_source(rel: str, root: Path = STDLIB) -> str:
    """File text (UTF-8; undecodable bytes replaced, a handful of stdlib files are Latin-1)."""
    return (root / rel).read_bytes().decode("utf-8", errors="replace")


def split_files(root: Path = STDLIB) -> tuple[list[str], list[str]]:
    """(train files, held-out files), each sorted."""
    files = source_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) with the one special token EOT (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_files(tok: Tokenizer, files: list[str], root: Path = STDLIB) -> list[np.ndarray]:
    """Token ids (int32) of every file, in order."""
    encs = tok.encode_batch([read_source(f, root) for f in files])
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]


def token_stream(tok: Tokenizer, files: list[str], root: Path = STDLIB) -> np.ndarray:
    """All files' token ids concatenated, each file followed by EOT (int64)."""
    eot = tok.token_to_id(EOT)
    parts = []
    for ids in encode_files(tok, files, root):
        parts.append(ids)
        parts.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(parts).astype(np.int64)
