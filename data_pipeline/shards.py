"""Building, resolving, inspecting and pre-encoding prompt shards (webdataset tars, DESIGN.md §5).

`build_shards` turns a .txt (one prompt per line), .jsonl, .csv or .parquet file into tars of `per_shard`
samples named `KEY.txt` (+ `KEY.json` with negative_prompt / seed / size when the input has those columns).
Keys are the running sample number, zero-padded, so they are unique across shards and sort in build order.
`encode_shards` writes the same samples with `KEY.emb.pth` beside `txt`: a dict of tensors (no batch dim)
saved with `torch.save`, read back with `weights_only=True`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from data_pipeline import storage
from data_pipeline.order import ShardTask
from data_pipeline.reader import Encoder, ReadOptions, ShardReader
from data_pipeline.records import BadRecord, PromptRecord

META_COLUMNS = ("negative_prompt", "seed", "size")
INPUT_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


# ------------------------------------------------------------------------------------------- resolving
def resolve_shards(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs from a list, a comma-separated string, a brace pattern, one .tar, or a dir/prefix of .tars."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in resolve_shards(s)]
    spec = str(spec).strip()
    if not spec:
        raise ValueError("empty shard specification (data.shards)")
    if "," in spec and "{" not in spec:
        return resolve_shards([s for s in spec.split(",") if s.strip()])
    if "{" in spec:
        import braceexpand

        return list(braceexpand.braceexpand(spec))
    if spec.endswith(".tar"):
        return [spec]
    names = [n for n in storage.listdir(spec) if n.endswith(".tar")]
    if not names:
        raise ValueError(f"no .tar shards found under {spec!r}")
    return [storage.join(spec, n) for n in names]


# -------------------------------------------------------------------------------------------- building
def _input_kind(path: str) -> str:
    for ext, kind in INPUT_KINDS.items():
        if path.lower().endswith(ext):
            return kind
    raise ValueError(f"{path}: unsupported input (expected one of {', '.join(INPUT_KINDS)})")


@dataclass(frozen=True)
class BadRow:
    """An input row `shards build` skips: where it is (file:line, or file row N for parquet) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def _undecodable(text: str) -> int:
    """Index of the first byte that was not UTF-8 (decoded with surrogateescape), or -1."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return i
    return -1


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) per line; bytes that are not UTF-8 survive as lone surrogates (surrogateescape)."""
    with storage.open_url(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")


def read_rows(path: str, column: str = "prompt") -> Iterator[tuple[str, dict[str, Any]] | BadRow]:
    """(prompt, meta) per input row, meta from the negative_prompt / seed / size columns when present; a
    `BadRow` (file and line/row number, reason) for a row that cannot be used (bytes that are not UTF-8,
    invalid JSON, a wrong field), which the builder counts and skips (issue 12)."""
    kind = _input_kind(path)
    if kind == "txt":
        for lineno, line in _lines(path):
            at = _undecodable(line)
            yield BadRow(f"{path}:{lineno}", f"not UTF-8 (byte {at})") if at >= 0 else (line, {})
        return
    if kind == "parquet":
        yield from _parquet_rows(path, column)
        return
    if kind == "csv":
        yield from _csv_rows(path, column)
        return
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if _undecodable(line) >= 0:
            yield BadRow(where, f"not UTF-8 (byte {_undecodable(line)})")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRow(where, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or column not in obj:
            yield BadRow(where, f"expected an object with key {column!r} (see --column)")
            continue
        yield obj[column], {k: obj[k] for k in META_COLUMNS if obj.get(k) is not None}


def _csv_rows(path: str, column: str) -> Iterator[tuple[str, dict[str, Any]] | BadRow]:
    with storage.open_url(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{path}: no column {column!r} (columns: {reader.fieldnames}); use --column")
        line = reader.line_num + 1  # the line the next row starts on (a quoted field may span lines)
        for row in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            values = [v for v in row.values() if isinstance(v, str)]
            if any(_undecodable(v) >= 0 for v in values):
                yield BadRow(where, "not UTF-8")
                continue
            try:
                meta: dict[str, Any] = {}
                if row.get("negative_prompt"):
                    meta["negative_prompt"] = row["negative_prompt"]
                if row.get("seed"):
                    meta["seed"] = int(row["seed"])
                if row.get("size"):
                    meta["size"] = json.loads(row["size"])
            except ValueError as e:
                yield BadRow(where, f"bad seed/size column ({e})")
                continue
            yield row[column] or "", meta


def _parquet_rows(path: str, column: str) -> Iterator[tuple[str, dict[str, Any]] | BadRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_url(path, "rb") as f:
        table = pq.read_table(f)
    if column not in table.column_names:
        raise ValueError(f"{path}: no column {column!r} (columns: {table.column_names}); use --column")
    metas = [c for c in META_COLUMNS if c in table.column_names]
    # strings as raw bytes, decoded row by row: one row of bad bytes must not fail the whole column
    prompts = table.column(column)
    if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
        prompts = prompts.cast(pa.binary())
    meta_rows = table.select(metas).to_pylist() if metas else None
    for i, raw in enumerate(prompts.to_pylist()):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(f"{path} row {i + 1}", f"not UTF-8 (byte {e.start})")
                continue
        meta = {k: v for k, v in (meta_rows[i] if meta_rows else {}).items() if v is not None}
        yield raw, meta


def normalize_text(s: str) -> str:
    """Unicode NFC and runs of whitespace (incl. newlines) collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", s).split())


@dataclass
class BuildReport:
    urls: list[str] = field(default_factory=list)
    samples: int = 0
    empty: int = 0  # input rows without text, not written
    duplicates: int = 0  # dropped by dedup
    bad_rows: list[BadRow] = field(default_factory=list)  # not UTF-8, invalid JSON, ...: skipped (issue 12)


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A webdataset tar of `samples` in memory (every shard writer of the project uses this one)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0.0) as w:  # fixed mtime: identical inputs give identical shards
        for s in samples:
            w.write(s)
    return buf.getvalue()


def build_shards(input_path: str, out: str, column: str = "prompt", per_shard: int = 1000, normalize: bool = False,
                 dedup: bool = False, prefix: str = "shard", progress: bool = True) -> BuildReport:
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    storage.makedirs(out)
    existing = [n for n in storage.listdir(out) if n.endswith(".tar")]
    if existing:
        raise FileExistsError(f"{out} already holds {len(existing)} shards ({existing[0]}, ...); "
                              "write to an empty location")
    from tqdm import tqdm

    report = BuildReport()
    seen: set[bytes] = set()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        url = storage.join(out, f"{prefix}-{len(report.urls):06d}.tar")
        storage.put_bytes(url, tar_bytes(pending))
        report.urls.append(url)
        pending.clear()

    for row in tqdm(read_rows(input_path, column), desc="prompts", unit="prompt", disable=not progress):
        if isinstance(row, BadRow):
            report.bad_rows.append(row)
            print(f"skipped {row}", file=sys.stderr)  # every bad row, named: the user fixes the source file
            continue
        prompt, meta = row
        text = "" if prompt is None else str(prompt)
        if normalize:
            text = normalize_text(text)
        if not text.strip():
            report.empty += 1
            continue
        if dedup:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                report.duplicates += 1
                continue
            seen.add(digest)
        sample = {"__key__": f"{report.samples:09d}", "txt": text.encode("utf-8")}
        if meta:
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        pending.append(sample)
        report.samples += 1
        if len(pending) == per_shard:
            flush()
    if pending:
        flush()
    if not report.urls:
        raise ValueError(f"{input_path}: no prompts to write ({report.empty} empty rows, "
                         f"{len(report.bad_rows)} bad rows)")
    return report


# ------------------------------------------------------------------------------------------ inspecting
@dataclass
class InspectReport:
    shards: list[tuple[str, int]] = field(default_factory=list)  # (url, raw samples); -1 when unreadable
    samples: int = 0  # valid records
    examples: list[PromptRecord] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (url, error)
    truncated: int = 0


def _read_plain(urls: list[str], options: ReadOptions, encode: Optional[Encoder] = None) -> Iterator[Any]:
    opts = ReadOptions(**{**options.__dict__, "shuffle_shards": False, "shuffle_within_shard": False})
    reader = ShardReader(urls, 0, opts, (lambda: encode) if encode is not None else None)
    for i in range(len(urls)):
        yield reader.read(ShardTask(i, 0, i, i, 0))


def inspect(url: str | list[str], num_examples: int = 3, options: Optional[ReadOptions] = None,
            progress: bool = False) -> InspectReport:
    """Count shards and samples, keep a few examples and every bad record with its shard and key."""
    from tqdm import tqdm

    urls = resolve_shards(url)
    report = InspectReport()
    for result in tqdm(_read_plain(urls, options or ReadOptions()), total=len(urls), desc="shards",
                       disable=not progress):
        if result.error is not None:
            report.shards.append((result.url, -1))
            report.unreadable.append((result.url, result.error))
            continue
        report.shards.append((result.url, result.num_samples))
        for _, item in result.items:
            if isinstance(item, BadRecord):
                report.bad.append(item)
            else:
                report.samples += 1
                report.truncated += bool(item.truncated_from)
                if len(report.examples) < num_examples:
                    report.examples.append(item)
    return report


def format_inspect(report: InspectReport) -> str:
    lines = [f"shards: {len(report.shards)} ({len(report.unreadable)} unreadable)",
             f"valid samples: {report.samples}   bad records: {len(report.bad)}   truncated prompts: {report.truncated}"]
    for rec in report.examples:
        lines.append(f"  sample {rec.shard} key={rec.key!r}: {rec.txt[:100]!r}" + (f" meta={rec.meta}" if rec.meta else ""))
    for url, err in report.unreadable:
        lines.append(f"  UNREADABLE {url}: {err}")
    for bad in report.bad:
        lines.append(f"  BAD {bad}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- encoding
def encode_shards(src: str | list[str], out: str, encode: Callable[[list[str]], dict[str, Any]],
                  options: Optional[ReadOptions] = None, progress: bool = True) -> InspectReport:
    """Write each readable shard of `src` to `out` (same name) with `emb.pth` beside `txt` per sample.

    Bad records and unreadable shards are dropped and listed in the returned report.
    """
    import torch
    from tqdm import tqdm

    from data_pipeline.encoding.packing import unpack

    urls = resolve_shards(src)
    storage.makedirs(out)
    report = InspectReport()
    opts = options or ReadOptions()
    for result in tqdm(_read_plain(urls, opts, encode), total=len(urls), desc="encode", disable=not progress):
        if result.error is not None:
            report.unreadable.append((result.url, result.error))
            continue
        samples = []
        for _, item in result.items:
            if isinstance(item, BadRecord):
                report.bad.append(item)
                continue
            buf = io.BytesIO()
            torch.save({k: v.contiguous() for k, v in unpack(item.embeddings).items()}, buf)
            sample = {"__key__": item.key, "txt": item.txt.encode("utf-8"), "emb.pth": buf.getvalue()}
            if item.meta:
                sample["json"] = json.dumps(item.meta, ensure_ascii=False).encode("utf-8")
            samples.append(sample)
            report.samples += 1
        report.shards.append((storage.join(out, storage.basename(result.url)), len(samples)))
        if samples:
            storage.put_bytes(report.shards[-1][0], tar_bytes(samples))
    return report
