"""Content-addressed blob store on local disk: attachments and original messages."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path

_DIGEST = re.compile(r"[0-9a-f]{64}")


class DiskBlobStore:
    """Files named by their sha256 under `root/ab/cd/<digest>`; writing the same bytes twice is free."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: set[str] = set()  # fan-out directories known to exist
        self._names = itertools.count()

    def path(self, sha256: str) -> Path:
        if not _DIGEST.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        folder = os.path.join(self.root, digest[:2], digest[2:4])
        target = os.path.join(folder, digest)
        if os.path.exists(target):
            return digest
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        # Write then rename, so a reader never sees half a file; the name is unique to this
        # process and call, so concurrent writers of the same blob never share a temp file.
        tmp = f"{target}.{os.getpid()}.{next(self._names)}.tmp"
        with open(tmp, "xb") as out:
            out.write(data)
        os.replace(tmp, target)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()
