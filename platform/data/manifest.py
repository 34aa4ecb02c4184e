"""Dataset manifests: the list of images that curation writes and training reads.

A manifest is one Parquet file with a row per image and a JSON metadata block in the
Parquet schema metadata. It is content-addressed: its digest is a SHA-256 over the rows
only (not the metadata, not the Parquet encoding), so the same rows written by different
tools or pyarrow versions have the same digest, and lineage can point at it.

Columns (``SCHEMA``): ``uri`` (the image's identity: its original location), ``size`` (bytes),
``sha256`` (hex of the image bytes), ``width``/``height`` (after EXIF orientation), ``label``
(class index into ``metadata["classes"]``, or null), ``source`` (which pool it came from, or
null), and for packed data ``shard``/``offset``: the bytes are ``size`` bytes at ``offset``
inside the tar shard ``shard`` rather than at ``uri``.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("offset", pa.int64()),
    ]
)
METADATA_KEY = b"dinoforge.manifest"
FORMAT_VERSION = 1
# Rows are hashed in blocks of this many, so the digest does not depend on how a reader
# happens to chunk the table.
DIGEST_BLOCK_ROWS = 65536


class ManifestError(ValueError):
    pass


def _column_bytes(column: pa.Array) -> Iterator[bytes]:
    """Canonical bytes of one column block: validity, then values (strings as lengths + data)."""
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    yield np.packbits(nulls).tobytes()
    if pa.types.is_string(column.type):
        column = column.cast(pa.large_string())
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[column.offset : column.offset + len(column) + 1]
        yield np.diff(offsets).astype("<i8").tobytes()
        data = column.buffers()[2]
        yield b"" if data is None else data.to_pybytes()[offsets[0] : offsets[-1]]
    else:
        yield pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype("<i8").tobytes()


def _blocks(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.Table]:
    """Re-slices record batches into tables of exactly DIGEST_BLOCK_ROWS rows (the last shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= DIGEST_BLOCK_ROWS:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, DIGEST_BLOCK_ROWS)
            rest = table.slice(DIGEST_BLOCK_ROWS)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def rows_digest(batches: Iterable[pa.RecordBatch]) -> str:
    """``sha256:<hex>`` over the rows, column by column within fixed-size row blocks."""
    digest = hashlib.sha256(json.dumps([f.name for f in SCHEMA]).encode())
    for block in _blocks(batches):
        for name in SCHEMA.names:
            for chunk in _column_bytes(block.column(name).combine_chunks()):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def creator_info(command: str) -> dict[str, str]:
    from importlib.metadata import version

    return {
        "tool": f"dinoforge {version('dinoforge')}",
        "command": command,
        "user": getpass.getuser(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Manifest:
    """Rows (a pyarrow Table with SCHEMA) plus metadata: ``creator``, ``parents`` (list of
    ``{"uri", "digest"}``), ``classes`` and anything the writer adds (e.g. ``skipped`` counts).

    Workers index the Arrow columns directly: they are shared copy-on-write after fork,
    unlike Python lists whose reference counts would make every worker copy them."""

    table: pa.Table
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = [(f.name, f.type) for f in SCHEMA]
        if [(f.name, f.type) for f in self.table.schema] != expected:
            raise ManifestError(f"manifest columns must be {expected}, got {self.table.schema}")
        for name in ("uri", "size", "sha256", "width", "height"):
            if self.table.column(name).null_count:
                raise ManifestError(f"manifest column {name!r} has null values")
        self.table = self.table.cast(SCHEMA)  # other writers may not mark the required columns not-null
        shard_nulls = self.table.column("shard").is_null()
        if not pc.all(pc.equal(shard_nulls, self.table.column("offset").is_null())).as_py() and len(self.table):
            raise ManifestError("manifest columns 'shard' and 'offset' must be null in the same rows")
        self._digest: str | None = None

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], metadata: dict[str, Any] | None = None) -> "Manifest":
        """Rows as dicts; absent optional columns are null."""
        columns = {name: [row.get(name) for row in rows] for name in SCHEMA.names}
        return cls(pa.table(columns, schema=SCHEMA), dict(metadata or {}))

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = rows_digest(self.table.to_batches())
        return self._digest

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.get("classes", []))

    def row(self, index: int) -> dict[str, Any]:
        return {name: self.table.column(name)[index].as_py() for name in SCHEMA.names}

    def write(self, uri: str) -> str:
        """Writes the manifest (digest recorded in the metadata) and returns its digest."""
        metadata = {"format_version": FORMAT_VERSION, **self.metadata, "digest": self.digest, "num_rows": len(self)}
        table = self.table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        fs, path = fsspec.core.url_to_fs(uri)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        # One PUT: an object store never shows a partial manifest, nor one left by a failed write.
        fs.pipe_file(path, buffer.getvalue().to_pybytes())
        return self.digest

    @classmethod
    def read(cls, uri: str, verify: bool = True) -> "Manifest":
        """Reads a manifest; with ``verify`` the rows must hash to the recorded digest."""
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"manifest {uri} does not exist")
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ManifestError(f"{uri} is not a dinoforge manifest (no {METADATA_KEY.decode()} metadata)")
        metadata = json.loads(raw)
        manifest = cls(table.replace_schema_metadata(None), {k: v for k, v in metadata.items() if k not in ("digest", "num_rows")})
        if not verify:
            manifest._digest = metadata.get("digest")
        elif manifest.digest != metadata.get("digest"):
            raise ManifestError(f"manifest {uri}: rows hash to {manifest.digest}, but its metadata records {metadata.get('digest')}")
        return manifest
