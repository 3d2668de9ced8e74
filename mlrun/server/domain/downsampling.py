"""Downsampling of metric series, the pure part: bucket plans, the final selection, and cursors.

Owns:
- `plan_buckets`: how a series' key range [lo, hi] is cut into interior buckets of (nearly)
  equal key width for a method and a point budget. The first key (lo) and the last key (hi)
  are never inside a bucket: they are kept as they are, so every downsampled series starts and
  ends on a stored point. Bucket counts never exceed the interior keys available, so a range
  smaller than the budget cannot divide by zero (it yields one key per bucket).
- `plan_block_buckets`: the same for a long series read from its block rollups: buckets of
  whole blocks (at least `MIN_BLOCKS_PER_BUCKET`), the first and last point kept as well.
- the final selection over per-bucket statistics computed by ClickHouse (`storage.
  metric_queries`): `select_lttb` (Largest-Triangle-Three-Buckets over candidate points),
  `select_minmax` (first, min, max, last per bucket: a one-point spike always survives) and
  `select_avg` (one mean point per bucket); `select_lttb_columns`, the same LTTB over bucket
  columns (what the server runs: no record objects per bucket).
- opaque cursors (`encode_cursor` / `decode_cursor`): URL-safe base64 of a msgspec array.

LTTB here is MinMaxLTTB (Van Der Donckt et al., 2022, as in plotly-resampler/tsdownsample, with
a minmax ratio of 2): ClickHouse returns each LTTB bucket's count, means, and its min and max
points; `select_lttb` then runs textbook LTTB where each bucket's candidates are those two points
and the "next bucket average" is exact. With every point of a bucket as candidates (what the
unit tests feed it) it *is* textbook LTTB. A ratio of 4 (two sub-buckets per bucket) was tried
first: it doubles the rows ClickHouse returns and Python selects from, which made a comparison
of 20 runs about twice as slow.

Invariants: output keys are strictly increasing; the first and last stored keys are always in the
output; a series is never longer than the budget it was planned for. Ties between candidates of
equal area go to the lowest key (textbook LTTB's `>`).

Must not import I/O, storage or the HTTP/gRPC edges (only `errors`, which is pure).
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar, cast

import msgspec

from mlrun.server.errors import InvalidInput
from mlrun.wire.error_codes import ErrorCode

Method = Literal["lttb", "minmax", "avg"]

# Index of the bucket holding only the first key / only the last key (ClickHouse computes the
# same as `BucketPlan.index_of`: `if(k = lo, -1, if(k = hi, -2, intDiv(...)))`).
FIRST_BUCKET = -1
LAST_BUCKET = -2
# Points per minmax bucket: first, min, max, last.
MINMAX_POINTS_PER_BUCKET = 4


class Sample(NamedTuple):
    """One stored point of a series. `key` is its axis (step for metrics, epoch ms for system
    metrics); `other` is the remaining coordinate (the timestamp for metrics, the step for
    system metrics)."""

    key: int
    value: float
    other: int


class Bucket(NamedTuple):
    """What ClickHouse reports for one bucket: how many points, their means, and the points the
    final selection may choose from (sorted by key). Selections take buckets in slot order."""

    slot: int
    size: int
    mean_key: float
    mean_value: float
    mean_other: float
    candidates: tuple[Sample, ...]


@dataclass(frozen=True, slots=True)
class BucketPlan:
    """`count` interior buckets over the keys lo+1 .. hi-1 (`span` = hi - lo - 1 of them).

    Proportional (`width` 0): key k goes to ((k - lo - 1) * count) // span, so the buckets
    cover floor or ceil(span / count) keys each, exactly like textbook LTTB's index buckets
    over dense steps. When span * count could overflow Int64 (spans beyond ~10^13 keys), the
    plan falls back to a fixed `width`: k goes to (k - lo - 1) // width."""

    lo: int
    hi: int
    count: int
    width: int = 0

    @property
    def span(self) -> int:
        return self.hi - self.lo - 1

    def index_of(self, key: int) -> int:
        if key == self.lo:
            return FIRST_BUCKET
        if key == self.hi:
            return LAST_BUCKET
        if self.width:
            return (key - self.lo - 1) // self.width
        return ((key - self.lo - 1) * self.count) // self.span


def interior_buckets(method: Method, max_points: int) -> int:
    """How many interior buckets a method may use within `max_points` output points (two of
    which are the first and last point)."""
    budget = max(0, max_points - 2)
    if method == "minmax":
        return budget // MINMAX_POINTS_PER_BUCKET
    return budget


# Products (k - lo - 1) * count stay below this in ClickHouse's Int64 arithmetic.
_MAX_PROPORTIONAL_PRODUCT = 2**62


def plan_buckets(method: Method, lo: int, hi: int, max_points: int) -> BucketPlan:
    """Interior buckets over (lo, hi) for `method` within `max_points`: never more buckets
    than interior keys (a small range gets one key per bucket, no division by zero)."""
    if hi < lo:
        raise ValueError("hi must not be below lo")
    span = hi - lo - 1
    count = min(interior_buckets(method, max_points), max(span, 0))
    if count <= 0:
        return BucketPlan(lo=lo, hi=hi, count=0, width=1)
    if span * count < _MAX_PROPORTIONAL_PRODUCT:
        return BucketPlan(lo=lo, hi=hi, count=count)
    width = -(-span // count)  # ceil
    return BucketPlan(lo=lo, hi=hi, count=-(-span // width), width=width)


# A block plan is used only when every bucket spans at least this many whole blocks: then it
# has more than 3/4 of the buckets the budget allows (rounding the group up loses less than
# one block per bucket), and each bucket combines 4+ pre-aggregated rows instead of 512+ points.
MIN_BLOCKS_PER_BUCKET = 4


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Interior buckets made of whole blocks of `block_steps` consecutive keys (the rollups of
    `metric_blocks`): block b = key // block_steps goes to bucket (b - first_block) // group.
    The first and last keys are inside the first and last buckets (a block cannot be split);
    the selections drop a candidate that repeats them (`_strictly_increasing`)."""

    first_block: int
    last_block: int
    group: int

    @property
    def count(self) -> int:
        return (self.last_block - self.first_block) // self.group + 1


def plan_block_buckets(
    method: Method, lo: int, hi: int, max_points: int, block_steps: int
) -> BlockPlan | None:
    """Buckets of whole blocks over the keys lo..hi within `max_points`, or None when the
    range is too short for at least `MIN_BLOCKS_PER_BUCKET` blocks per bucket."""
    if hi < lo or block_steps < 1:
        raise ValueError("need lo <= hi and a positive block size")
    wanted = interior_buckets(method, max_points)
    if wanted <= 0:
        return None
    first, last = lo // block_steps, hi // block_steps
    group = -(-(last - first + 1) // wanted)  # ceil: never more buckets than wanted
    if group < MIN_BLOCKS_PER_BUCKET:
        return None
    return BlockPlan(first_block=first, last_block=last, group=group)


# --------------------------------------------------------------------------- final selection


def select_lttb(first: Sample, last: Sample | None, buckets: Sequence[Bucket]) -> list[Sample]:
    """LTTB over `buckets` (in slot order): one candidate per non-empty bucket, the one forming
    the largest triangle with the previously selected point and the next bucket's mean (the
    last point after the last bucket)."""
    groups = [bucket for bucket in buckets if bucket.size > 0]
    selected = [first]
    previous = first
    for position, group in enumerate(groups):
        if position + 1 < len(groups):
            c_key, c_value = groups[position + 1].mean_key, groups[position + 1].mean_value
        elif last is not None:
            c_key, c_value = float(last.key), last.value
        else:
            c_key, c_value = group.mean_key, group.mean_value
        # Textbook LTTB's area, in its order of operations (so ties break the same way).
        best: Sample | None = None
        best_area = -1.0
        a_key, a_value = previous.key, previous.value
        for candidate in group.candidates:
            # _triangle_area, inlined: this loop runs for every candidate of every bucket.
            area = abs((a_key - c_key) * (candidate.value - a_value)
                       - (a_key - candidate.key) * (c_value - a_value)) * 0.5
            if area > best_area:
                best_area, best = area, candidate
        if best is not None:
            selected.append(best)
            previous = best
    if last is not None and last.key != first.key:
        selected.append(last)
    return _strictly_increasing(selected)


@dataclass(frozen=True, slots=True)
class LttbColumns:
    """LTTB buckets column by column, as ClickHouse returns them (slot order): per bucket its
    slot, size, means, and its two candidates, the points of lowest and highest value. What
    `select_lttb_columns` reads without building a `Bucket` and two `Sample`s per bucket
    (measured: that construction cost more than the selection for a 20-run comparison)."""

    slots: Sequence[int]
    sizes: Sequence[int]
    mean_keys: Sequence[float]
    mean_values: Sequence[float]
    low_keys: Sequence[int]
    low_values: Sequence[float]
    low_others: Sequence[int]
    high_keys: Sequence[int]
    high_values: Sequence[float]
    high_others: Sequence[int]


def select_lttb_columns(first: Sample, last: Sample | None, columns: LttbColumns,
                        bucket_count: int) -> list[Sample]:
    """`select_lttb` over `columns` (the buckets with slot 0 .. bucket_count - 1), with each
    bucket's candidates (low, high) in key order: the same selection, point for point.

    Hot (one pass per series of a comparison, 10k+ buckets a request): columns are bound to
    locals and each bucket's "next mean" is taken from precomputed lists."""
    c = columns
    groups = [i for i, (slot, size) in enumerate(zip(c.slots, c.sizes, strict=True))
              if 0 <= slot < bucket_count and size > 0]
    if not groups:
        return _strictly_increasing([first] if last is None else [first, last])
    # Each bucket's columns, in group order: slices when the groups are contiguous (the usual
    # case: every bucket has points), else picked (C-level either way).
    if groups[-1] - groups[0] + 1 == len(groups):
        start, stop = groups[0], groups[-1] + 1
        picked: list[Sequence[int] | Sequence[float]] = [
            column[start:stop] for column in (c.mean_keys, c.mean_values, c.low_keys,
                                              c.low_values, c.low_others, c.high_keys,
                                              c.high_values, c.high_others)]
    else:
        picked = [[column[i] for i in groups]
                  for column in (c.mean_keys, c.mean_values, c.low_keys, c.low_values,
                                 c.low_others, c.high_keys, c.high_values, c.high_others)]
    mean_keys, mean_values = picked[0], picked[1]
    # The point each bucket's triangle reaches towards: the next bucket's mean; after the
    # last bucket the series' last point (or, without one, the bucket's own mean).
    next_keys = list(mean_keys[1:])
    next_values = list(mean_values[1:])
    if last is not None:
        next_keys.append(float(last.key))
        next_values.append(last.value)
    else:
        next_keys.append(mean_keys[-1])
        next_values.append(mean_values[-1])
    chosen: list[tuple[int, float, int]] = []
    a_key, a_value = first.key, first.value
    for (low_key, low_value, low_other, high_key, high_value, high_other, c_key,
         c_value) in zip(*picked[2:], next_keys, next_values, strict=True):
        # Textbook LTTB's area in its order of operations (the shared factors computed once
        # give the same floats); the lower key wins a tie.
        base_dx = a_key - c_key
        base_dy = c_value - a_value
        low_area = abs(base_dx * (low_value - a_value) - (a_key - low_key) * base_dy) * 0.5
        high_area = abs(base_dx * (high_value - a_value) - (a_key - high_key) * base_dy) * 0.5
        if low_area >= high_area if low_key <= high_key else low_area > high_area:
            a_key, a_value = low_key, float(low_value)
            chosen.append((a_key, a_value, low_other))
        else:
            a_key, a_value = high_key, float(high_value)
            chosen.append((a_key, a_value, high_other))
    # tuple.__new__ straight: no Python-level constructor call per point (Sample has no
    # __init__ of its own; its __new__ and _make are Python functions).
    selected = [first, *cast(Iterable[Sample], map(_new_sample, chosen))]
    if last is not None and last.key != first.key:
        selected.append(last)
    return _strictly_increasing(selected)


def select_minmax(first: Sample, last: Sample | None, buckets: Sequence[Bucket]) -> list[Sample]:
    """Per bucket its first, min, max and last point (candidates, in any order), deduplicated
    by key, between the series' first and last point."""
    selected = [first]
    for bucket in buckets:
        if bucket.size > 0:
            selected.extend(sorted(set(bucket.candidates)))
    if last is not None:
        selected.append(last)
    return _strictly_increasing(selected)


def select_avg(first: Sample, last: Sample | None, buckets: Sequence[Bucket]) -> list[Sample]:
    """One point per bucket at its mean key with its mean value, between the first and last
    point. Means of interior keys round to interior keys, so keys stay strictly increasing."""
    selected = [first]
    for bucket in buckets:
        if bucket.size > 0 and math.isfinite(bucket.mean_value):
            selected.append(
                Sample(round(bucket.mean_key), bucket.mean_value, round(bucket.mean_other))
            )
    if last is not None:
        selected.append(last)
    return _strictly_increasing(selected)


_new_sample = functools.partial(tuple.__new__, Sample)


def _strictly_increasing(samples: list[Sample]) -> list[Sample]:
    """Drop any sample whose key does not exceed its predecessor's (duplicate keys collapse to
    the first; the inputs are already in key order)."""
    keys = list(map(operator.itemgetter(0), samples))
    if all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
        return samples  # the usual case, checked at C level
    kept: list[Sample] = []
    for sample in samples:
        if not kept or sample.key > kept[-1].key:
            kept.append(sample)
    return kept


# --------------------------------------------------------------------------- cursors

C = TypeVar("C", bound=msgspec.Struct)


class RunsCursor(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Position in a run listing: the sort it belongs to, the last row's sort value, its id."""

    sort: str
    value: str | int | float | None
    run_id: str


class SeriesCursor(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Position in a raw series: its name and the last key already returned."""

    name: str
    after_key: int


_cursor_encoder = msgspec.json.Encoder()
MAX_CURSOR_CHARS = 4096


def encode_cursor(position: msgspec.Struct) -> str:
    return base64.urlsafe_b64encode(_cursor_encoder.encode(position)).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, kind: type[C], *, field: str = "cursor") -> C:
    """The position in `text`, or 400 `invalid_cursor` naming `field`."""
    invalid = InvalidInput(
        "the cursor is not one this server issued for this query",
        code=ErrorCode.INVALID_CURSOR,
        field=field,
    )
    if len(text) > MAX_CURSOR_CHARS or not text.isascii():
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return msgspec.json.decode(raw, type=kind)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise invalid from None
