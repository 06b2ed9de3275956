"""Test helpers: source layouts written by hand as their tools write them (img2dataset's three output forms, small
JPEGs), and MDS rows read back through streaming's own shard readers."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from streaming.base.format import reader_from_json


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="JPEG")
    return out.getvalue()


def read_mds(folder: Path) -> list[dict]:
    """Every row of an (uncompressed) MDS directory, in order, through streaming's shard readers."""
    index = json.loads((folder / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        rows.extend(reader.get_item(i) for i in range(len(reader)))
    return rows


@dataclass
class Img2datasetRow:
    """One input URL as img2dataset records it: `image` None where the download failed."""

    key: str
    url: str
    caption: str | None
    image: bytes | None
    status: str = "success"
    error_message: str | None = None

    def meta(self) -> dict:
        """img2dataset's per-URL metadata (its status parquet's row, and KEY.json in the tar and files forms)."""
        size = 16 if self.image else None
        return {
            "caption": self.caption, "url": self.url, "key": self.key, "status": self.status,
            "error_message": self.error_message, "width": size, "height": size, "original_width": size,
            "original_height": size,
        }  # fmt: skip


META_SCHEMA = pa.schema(
    [("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
     ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
     ("original_width", pa.int32()), ("original_height", pa.int32())]
)  # fmt: skip


def write_img2dataset(folder: Path, shards: list[list[Img2datasetRow]], form: str) -> Path:
    """img2dataset output of `form` (`webdataset`, `files` or `parquet`): per shard NNNNN, `NNNNN.tar` / `NNNNN/`
    beside the status parquet `NNNNN.parquet`, or `NNNNN.parquet` with a `jpg` column; `NNNNN_stats.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, rows in enumerate(shards):
        name = f"{number:05d}"
        metas = [row.meta() for row in rows]
        if form == "parquet":
            schema = META_SCHEMA.append(pa.field("jpg", pa.binary()))
            table = pa.Table.from_pylist([{**meta, "jpg": row.image} for meta, row in zip(metas, rows)], schema)
        else:
            table = pa.Table.from_pylist(metas, META_SCHEMA)
            members = [
                (f"{row.key}.{ext}", data)
                for row in rows
                if row.image is not None
                for ext, data in (
                    ("jpg", row.image), ("txt", (row.caption or "").encode()),
                    ("json", json.dumps(row.meta(), indent=4).encode()),
                )
            ]  # fmt: skip
            if form == "webdataset":
                with tarfile.open(folder / f"{name}.tar", "w") as tar:
                    for member, data in members:
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            else:
                (folder / name).mkdir()
                for member, data in members:
                    (folder / name / member).write_bytes(data)
        pq.write_table(table, folder / f"{name}.parquet")
        successes = sum(row.status == "success" for row in rows)
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": len(rows), "successes": successes}))
    return folder
