"""Pseudonyms for patient identifiers and image names, made when a data set is loaded.

No patient identifier (a DICOM PatientID, a Kaggle ``person1234``, a ``patients.csv`` entry, a file name)
ever reaches a file gradleak writes: every file-based loader replaces it by a keyed hash,
HMAC-SHA256(key, identifier) truncated to 12 hex digits, with a recognisable prefix: ``pt-`` for patients
(``pt-3f9a1c2b7d04``) and ``im-`` for image names (``im-91c0d2e4aa1f.dcm``, the file's extension kept).
The same identifier gives the same pseudonym under the same key, so patient-disjoint splits, prior
exclusion and re-identification work across commands; without the key nobody can test a guessed
identifier against a pseudonym.

The synthetic phantoms identify nobody and keep their ids (``phantom7``).

The key is never written to any output. It is ``GRADLEAK_PSEUDONYM_KEY`` from the environment (at least 16
characters) when set, else a random key created once in ``$XDG_CONFIG_HOME/gradleak/pseudonym.key``
(``~/.config/gradleak/pseudonym.key`` when XDG_CONFIG_HOME is unset), readable by its owner only. Share
that key (or the variable) between machines that must agree on pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterable

from gradleak.errors import UserError

ENV_KEY = "GRADLEAK_PSEUDONYM_KEY"
KEY_FILE = "pseudonym.key"
MIN_KEY_CHARS = 16
DIGITS = 12
PATIENT_PREFIX, NAME_PREFIX = "pt-", "im-"
PATTERN = re.compile(rf"^{PATIENT_PREFIX}[0-9a-f]{{{DIGITS}}}$")
SYNTHETIC = re.compile(r"^phantom\d+$")  # the phantoms' ids, which identify nobody


def key_path() -> Path:
    """Where the machine's key lives when the environment gives none."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    if base.strip() and Path(base).is_absolute():
        return Path(base) / "gradleak" / KEY_FILE
    try:
        return Path.home() / ".config" / "gradleak" / KEY_FILE
    except RuntimeError:
        raise UserError(f"no home folder for the pseudonym key; set {ENV_KEY} or XDG_CONFIG_HOME") from None


def _read_key_file(path: Path) -> bytes:
    try:
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the pseudonym key {path}: {e}; fix or delete it, or set {ENV_KEY}") \
            from None
    if len(key) < MIN_KEY_CHARS:
        raise UserError(f"the pseudonym key {path} is damaged (too short); delete it to make a new one "
                        f"(pseudonyms then change) or set {ENV_KEY}")
    return key.encode("ascii")


def _create_key_file(path: Path) -> None:
    """Write a new random key with mode 0600; a key another process wrote first is kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise UserError(f"cannot create the pseudonym key {path}: {e}; set {ENV_KEY} instead") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32) + "\n")


@lru_cache(maxsize=4)
def _key(env_value: str | None, path: Path) -> bytes:
    if env_value is not None:
        if len(env_value.strip()) < MIN_KEY_CHARS:
            raise UserError(f"{ENV_KEY} must hold at least {MIN_KEY_CHARS} characters")
        return env_value.strip().encode("utf-8")
    if not path.exists():
        _create_key_file(path)
    return _read_key_file(path)


def pseudonym_key() -> bytes:
    """The key of this machine (see the module docstring)."""
    return _key(os.environ.get(ENV_KEY), key_path())


def _digest(kind: bytes, text: str) -> str:
    mac = hmac.new(pseudonym_key(), kind + b"\0" + text.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:DIGITS]


def patient_pseudonym(identifier: str) -> str:
    """``pt-`` and 12 hex digits of the keyed hash of a patient identifier."""
    return PATIENT_PREFIX + _digest(b"patient", str(identifier).strip())


def name_pseudonym(name: str) -> str:
    """``im-`` and 12 hex digits of the keyed hash of an image's name, with its extension."""
    suffix = PurePosixPath(str(name)).suffix.lower()
    return NAME_PREFIX + _digest(b"name", str(name)) + (suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else "")


def pseudonymise_patients(identifiers: Iterable[str]) -> list[str]:
    """Pseudonyms of a data set's patient identifiers, checked to keep distinct patients apart."""
    raw = [str(i) for i in identifiers]
    cache = {r: patient_pseudonym(r) for r in set(raw)}
    if len(set(cache.values())) != len(cache):  # 48 bits: not expected below billions of patients
        raise RuntimeError("two patient identifiers share a pseudonym")
    return [cache[r] for r in raw]


def pseudonymise_names(names: Iterable[str]) -> list[str]:
    return [name_pseudonym(n) for n in names]


def as_pseudonym(identifier: str) -> str:
    """What ``--exclude-patients`` and exclusion lists accept: a pseudonym (``pt-`` and 12 hex digits) and a
    synthetic phantom id (``phantom7``) as they are, any other identifier as its pseudonym."""
    text = str(identifier).strip()
    return text if PATTERN.match(text) or SYNTHETIC.match(text) else patient_pseudonym(text)
