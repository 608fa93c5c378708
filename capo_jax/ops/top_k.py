"""Exact top-K over the last axis: ``jax.lax.top_k``'s result without sorting whole rows on XLA:CPU.

XLA:CPU's TopK is a per-row partial sort of the V indices with a comparator, so its cost is the heap work on the
finite entries. Both functions here first find, per row, a value lo ≤ the k-th largest entry with few entries ≥ lo,
so that only those candidates matter:

* lower bound by bisection on group maxima — split the row into G ≥ 2k groups; if ≥ k group maxima are ≥ t then ≥ k
  entries are, so a bisection of t on the [N, G] maxima that keeps #{maxima ≥ lo} ≥ k lands near the k-th largest
  maximum (``_top_k_group_bound``); bisection steps on the whole rows tighten it where needed
  (``_top_k_lower_bound``, and the ``while_loop`` of ``top_k_set``);
* ``top_k`` (ordered, bit-identical to ``lax.top_k``): every entry below lo becomes −∞ and ``lax.top_k`` sorts the
  ≈ k finite entries left (the k largest are all ≥ lo, so the result is unchanged);
* ``top_k_set`` (the same (value, id) pairs as a set): the candidates x ≥ lo are compacted into ``capacity`` columns
  by a bit-packed select (``_compact``: 32 flags per word, running popcounts, a 5-step binary search inside the
  word), the k-th largest candidate is found by bisection on order-preserving integer keys (XLA's float order
  −0.0 < 0.0, NaN above +∞; ties by lower id) and the k taken are compacted again — elementwise passes only, no sort,
  no scatter;
* fallback — if a needed row still has more than ``capacity`` candidates (heavy ties) or holds a NaN, the whole call
  takes the exact ``top_k`` (``lax.cond``), so the result always equals ``lax.top_k``'s.

Off the CPU backend, or when V is only a few times k, both call ``jax.lax.top_k`` directly (``top_k`` also when
V > 48·k, where XLA:CPU's partial sort is the cheaper one). ``top_k_in_rounds`` is ``lax.top_k`` for k > 16 as rounds
of top-16, for accelerators whose own top-k kernel stops at k = 16 (XLA:GPU sorts whole rows beyond it); which path
a GPU should take is measured by ``benchmarks/gpu.py``, and none is chosen for it yet. The measured costs are in
``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _group_size(v: int, k: int) -> int:
  """Entries per group for the group-maxima bounds: at most V // k (so there are ≥ k groups), preferably a divisor of
  V (then the row reshapes into groups without a copy instead of slicing off a remainder)."""
  size = max(v // k, 1)
  divisor = max(d for d in range(1, size + 1) if v % d == 0)
  return divisor if 2 * divisor >= size else size


def _group_maxima(z_nv: Array, size: int) -> tuple[Array, Array]:
  """Maxima of the V // ``size`` groups {j, j + G, j + 2G, …} of each row ([N, G]) and the row maxima ([N]).

  Any partition of the row serves the bounds; strided groups make the maximum a reduction over a major axis, which
  XLA:CPU vectorises along the G contiguous groups. Entries past G·size (V not a multiple of ``size``) only enter
  the row maxima.
  """
  n, v = z_nv.shape
  groups = v // size
  group_max = jnp.max(z_nv[:, :groups * size].reshape(n, size, groups), axis=1)
  hi = jnp.max(group_max, axis=-1)
  if groups * size < v:
    hi = jnp.maximum(hi, jnp.max(z_nv[:, groups * size:], axis=-1))
  return group_max, hi


def _top_k_initial_bracket(z_nv: Array, k: int) -> tuple[Array, Array]:
  """Per row (lo, hi) with #{z ≥ lo} ≥ k and hi = row max: split the row into G ≥ k groups; the smallest group maximum
  has ≥ G ≥ k entries at or above it. (NaN rows: undefined; XLA:CPU's max does not reliably propagate NaN.)"""
  group_max, hi = _group_maxima(z_nv, _group_size(z_nv.shape[1], k))
  return jnp.min(group_max, axis=-1), hi


def _top_k_group_bound(z_nv: Array, k: int, steps: int = 10) -> tuple[Array, Array]:
  """Per row (lo, hi): lo ≤ the k-th largest entry, close to it, found on group maxima only; hi = row max.

  The row splits into G ≥ 2k groups (``_group_size``); if ≥ k group maxima are ≥ t then ≥ k entries are, so a
  bisection of t on the [N, G] maxima (``steps`` cheap passes, G ≈ V/8 elements) keeping #{maxima ≥ lo} ≥ k lands near
  the k-th largest maximum: far fewer passes over the full rows than bisection on the rows themselves for the same
  number of candidates left (docs/PERFORMANCE.md).
  """
  group_max, hi = _group_maxima(z_nv, _group_size(z_nv.shape[1], 2 * k))
  lo, top = jnp.min(group_max, axis=-1), hi
  for _ in range(steps):
    mid = lo + 0.5 * (hi - lo)
    enough = _count_at_least(group_max, mid) >= k
    lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
  return lo, top


def _row_count(hits_nm: Array) -> Array:
  """Per-row count of a boolean [N, M] (int32). Summed in two stages when M splits into 32-wide columns: XLA:CPU fuses
  that into one pass, faster than a single minor-axis sum."""
  n, m = hits_nm.shape
  hits = hits_nm.astype(jnp.int32)
  if m % 32 == 0 and m > 32:
    return jnp.sum(jnp.sum(hits.reshape(n, m // 32, 32), axis=1), axis=-1)
  return jnp.sum(hits, axis=-1)


def _count_at_least(z_nv: Array, threshold_n: Array) -> Array:
  """#{z ≥ threshold or z = NaN} per row (int32), as #{not z < threshold}."""
  return _row_count(~(z_nv < threshold_n[:, None]))


def _top_k_lower_bound(z_nv: Array, k: int, bisection_steps: int) -> Array:
  """A per-row value ``lo`` with at least ``k`` entries ``≥ lo``, as close below the k-th largest as cheaply found.

  ``_top_k_initial_bracket``, then ``bisection_steps`` halvings of [lo, row max] that keep the invariant
  #{z ≥ lo} ≥ k. Rows holding a NaN get −∞.
  """
  lo, hi = _top_k_initial_bracket(z_nv, k)
  for _ in range(bisection_steps):
    mid = lo + 0.5 * (hi - lo)
    enough = _count_at_least(z_nv, mid) >= k
    lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
  return jnp.where(jnp.any(jnp.isnan(z_nv), axis=-1), -jnp.inf, lo)


def _use_cpu_path(v: int, k: int, enabled: bool | None, min_ratio: int = 16, max_ratio: int | None = None) -> bool:
  """Whether a CPU path replaces ``lax.top_k``: ``enabled``, or by default on the CPU backend when min_ratio·K ≤ V
  (≤ max_ratio·K when given). The prefilter: 16 ≤ V/K ≤ 48 — below, its extra passes cost more than the sort saves;
  above, XLA:CPU's partial sort updates its heap so rarely that it is cheaper than the prefilter's passes. The set
  selection: V/K ≥ 4 (docs/PERFORMANCE.md)."""
  if enabled is None:
    enabled = (jax.default_backend() == "cpu" and v >= min_ratio * k
               and (max_ratio is None or v <= max_ratio * k))
  return bool(enabled) and v >= 2 * k


def top_k(x: Array, k: int, *, where: Array | None = None, prefilter: bool | None = None,
          bisection_steps: int = 3) -> tuple[Array, Array]:
  """``jax.lax.top_k(x, k)`` over the last axis, bit-identical (values, ids and their order, ties by lower id).

  XLA:CPU's TopK is a per-row ``std::partial_sort`` of the indices with a comparator, so its cost is mostly the heap
  work on the finite candidates. The ``prefilter`` path first replaces every entry below a cheap lower bound of the
  k-th largest value (``_top_k_lower_bound``: group maxima + a few bisection steps, ~5 vectorised passes over the
  row) by −∞: the k largest entries are all ≥ that bound, so the result is unchanged, and the sort then sees ~k finite
  values. Default: prefilter on the CPU backend when 16·k ≤ V ≤ 48·k (below, the extra passes cost more than the
  sort saves; above, the partial sort's heap is updated so rarely that one plain pass is cheaper — at k = 50:
  0.72× ``lax.top_k`` at V = 512, 0.96× at 3,072, 2× at 16,384); elsewhere the backend's own TopK. When the order of
  the k entries does not matter, ``top_k_set`` is faster still.

  ``where`` (boolean, ``x.shape[:-1]``): rows whose result is not needed (padding positions). With the prefilter
  their row is all −∞, which XLA:CPU sorts much faster; their result is then ids 0…k−1 with values 0 (finite, so
  downstream arithmetic stays NaN-free). Without the prefilter ``where`` is ignored (every row exact).
  """
  v = x.shape[-1]
  if not _use_cpu_path(v, k, prefilter, max_ratio=48):
    return jax.lax.top_k(x, k)
  lead = x.shape[:-1]
  z = x.reshape(-1, v)
  neg_inf = jnp.asarray(-jnp.inf, z.dtype)
  lo = _top_k_lower_bound(z, k, bisection_steps)
  filtered = jnp.where(z < lo[:, None], neg_inf, z)  # NaN stays NaN
  rows = None if where is None else jnp.broadcast_to(where, lead).reshape(-1, 1)
  if rows is not None:
    filtered = jnp.where(rows, filtered, neg_inf)
  _, ids = jax.lax.top_k(filtered, k)
  values = jnp.take_along_axis(z, ids, axis=-1)  # −∞ stand-ins never reach the top k; keep x's own values
  if rows is not None:
    values = jnp.where(rows, values, jnp.zeros_like(values))
  return values.reshape(*lead, k), ids.reshape(*lead, k)


def top_k_in_rounds(x: Array, k: int, *, round_k: int = 16) -> tuple[Array, Array]:
  """``jax.lax.top_k(x, k)`` over the last axis, bit-identical (values, ids and their order), as ⌈k / round_k⌉ calls
  of ``lax.top_k(·, round_k)``, each on the row with the earlier rounds' entries set to −∞.

  For accelerators: XLA:GPU runs a top-k of k ≤ 16 as one pass of its own kernel, and sorts whole rows for a
  larger k — CAPO's k = 50 over a vocabulary of 151,936. Each round returns the next
  ``round_k`` entries in ``lax.top_k``'s order (value descending, ties by lower id: a tie cut by a round goes on in
  the next one with the higher ids), so the rounds concatenate to ``lax.top_k``'s result whenever the k-th largest
  entry of every row is above −∞; otherwise (fewer than k entries above −∞, or NaN among the k) the whole call
  takes ``lax.top_k(x, k)`` itself (``lax.cond``). float32 only (others: ``lax.top_k``). Which is faster on a given
  GPU is measured by ``benchmarks/gpu.py`` (its top-K row); nothing takes this path by default.
  """
  v = x.shape[-1]
  if k <= round_k or v <= k or x.dtype != jnp.float32:
    return jax.lax.top_k(x, k)
  lead = x.shape[:-1]
  z = x.reshape(-1, v)
  column = jnp.arange(v, dtype=jnp.int32)[None, :]
  work, values, ids = z, [], []
  for start in range(0, k, round_k):
    # Only the ids leave the TopK: slicing its values output made XLA:CPU sort the whole rows instead (30× slower).
    _, idx = jax.lax.top_k(work, min(round_k, k - start))
    val = jnp.take_along_axis(work, idx, axis=-1)  # −∞ where an earlier round's entry came back (then not exact)
    values.append(val)
    ids.append(idx)
    if start + round_k < k:
      # The round took every entry above its last value t and, of those equal to t (in TopK's order: −0.0 < 0.0),
      # the ids up to the largest it returned: one elementwise pass, no scatter.
      round_keys = _order_keys(val)
      t = round_keys[:, -1:]
      last = jnp.max(jnp.where(round_keys == t, idx, -1), axis=-1, keepdims=True)
      key = _order_keys(work)
      work = jnp.where((key > t) | ((key == t) & (column <= last)), -jnp.inf, work)
  values, ids = jnp.concatenate(values, axis=-1), jnp.concatenate(ids, axis=-1)
  exact = jnp.all((values[:, -1] > -jnp.inf) & ~jnp.any(jnp.isnan(values), axis=-1))
  values, ids = jax.lax.cond(exact, lambda z: (values, ids), lambda z: tuple(jax.lax.top_k(z, k)), z)
  return values.reshape(*lead, k), ids.reshape(*lead, k)


def _order_keys(x: Array) -> Array:
  """int32 keys of float32 ``x`` in XLA:CPU TopK's order: −0.0 < 0.0, NaN above +∞ (the sign-flipped bit pattern)."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


# ``_compact`` walks the words of a row unrolled up to this many (a vocabulary of 1,024 is 32 words); longer rows take
# a binary search instead, whose size does not grow with V. The crossover is at about 64 words (docs/PERFORMANCE.md,
# notes); an unrolled walk over Qwen's 151,936 entries — 4,748 words — does not compile in 24 GiB.
_WALK_MAX_WORDS = 64


def _compact(mask_nm: Array, slots: int) -> tuple[Array, Array]:
  """Positions of the True entries of each row, in ascending order, in ``slots`` columns; and which are real.

  Bit-packed select: the row is cut into words of 32 flags; slot p lies in the word where the running popcount
  passes p (an unrolled walk over the words, or a binary search when there are more than ``_WALK_MAX_WORDS``), and
  inside it at the bit found by a 5-step binary search on popcounts. Every pass is elementwise over [N, M/32] or
  [N, slots], or a gather of [N, slots] (no sort, no scatter). Slots beyond the row's count get arbitrary in-range
  positions.
  """
  n, m = mask_nm.shape
  words = -(-m // 32)
  mask_nm = jnp.pad(mask_nm, ((0, 0), (0, words * 32 - m)))
  shifts = jnp.arange(32, dtype=jnp.uint32)
  bits = jnp.sum(mask_nm.reshape(n, words, 32).astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)
  counts = jax.lax.population_count(bits).astype(jnp.int32)
  ends = jnp.cumsum(counts, axis=-1)  # inclusive running count per word
  slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
  if words <= _WALK_MAX_WORDS:
    # The word of slot p is the first word whose running count passes p: walk the words (unrolled; one fused pass
    # on XLA:CPU), carrying that word's bits and the count before it (selects instead of gathers).
    word = jnp.zeros((n, slots), jnp.int32)
    start = jnp.zeros((n, slots), jnp.int32)
    bits_p = jnp.broadcast_to(bits[:, :1], (n, slots))
    for w in range(words - 1):
      past = ends[:, w:w + 1] <= slot
      word = word + past.astype(jnp.int32)
      start = jnp.where(past, ends[:, w:w + 1], start)
      bits_p = jnp.where(past, bits[:, w + 1:w + 2], bits_p)
  else:
    # Long rows (a vocabulary of 10⁵ is thousands of words): the same word — the first whose running count passes p,
    # else the last — by binary search on the running counts (⌈log2(words)⌉ gathers of [N, slots]; every word below
    # lo has ends ≤ p, the answer is at most hi), then its bits and the count before it by two more gathers.
    lo = jnp.zeros((n, slots), jnp.int32)
    hi = jnp.full((n, slots), words - 1, jnp.int32)
    for _ in range((words - 1).bit_length()):  # ⌈log2(words)⌉ halvings of [lo, hi]
      mid = (lo + hi) // 2
      past = jnp.take_along_axis(ends, mid, axis=-1) <= slot
      open_ = lo < hi
      lo, hi = jnp.where(open_ & past, mid + 1, lo), jnp.where(open_ & ~past, mid, hi)
    word = lo  # slots past the row's count land on the last word, as in the walk
    start = jnp.where(word > 0, jnp.take_along_axis(ends, jnp.maximum(word - 1, 0), axis=-1), 0)
    bits_p = jnp.take_along_axis(bits, word, axis=-1)
  rank = (slot - start).astype(jnp.uint32)
  pos = jnp.zeros_like(bits_p)
  for step in (16, 8, 4, 2, 1):  # largest pos with popcount(bits below pos) ≤ rank = the rank-th set bit
    trial = pos + step
    below = jax.lax.population_count(bits_p & ((jnp.uint32(1) << trial) - 1))
    pos = jnp.where(below <= rank, trial, pos)
  return jnp.minimum(word * 32 + pos.astype(jnp.int32), m - 1), slot < ends[:, -1:]


def _threshold_key(key_nc: Array, real_nc: Array, k: int) -> tuple[Array, Array]:
  """Per row the k-th largest of the real ``key_nc`` (uint32, order-preserving) and #{key ≥ it}.

  Bisection on the key: the largest T with #{key ≥ T} ≥ k. A row stops early once #{key ≥ lo} = k (the k entries
  ≥ lo are then the answer whatever T is inside [lo, hi]), so the ``while_loop`` runs about log2(range / gap) passes
  over [N, C] (C = the candidates' columns), at most 32.
  """
  lo = jnp.min(jnp.where(real_nc, key_nc, jnp.uint32(0xFFFFFFFF)), axis=-1)
  hi = jnp.max(jnp.where(real_nc, key_nc, jnp.uint32(0)), axis=-1)
  count_lo = jnp.sum(real_nc.astype(jnp.int32), axis=-1)

  def open_rows(c):
    lo, hi, count_lo = c
    return jnp.any((lo < hi) & (count_lo != k))

  def halve(c):
    lo, hi, count_lo = c
    mid = lo + (hi - lo + 1) // 2  # in (lo, hi]; no overflow in uint32
    count_mid = _row_count(key_nc >= mid[:, None])
    enough = count_mid >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1), jnp.where(enough, count_mid, count_lo)

  lo, _, count_lo = jax.lax.while_loop(open_rows, halve, (lo, hi, count_lo))
  return lo, count_lo


def _select_top_k(z_nv: Array, lo_n: Array, rows_n: Array, k: int, capacity: int) -> tuple[Array, Array]:
  """Steps 2–4 of ``top_k_set``: the k largest of each needed row's candidates z ≥ lo (at most ``capacity`` of them,
  at least k, no NaN), in id order; ids 0…k−1 and values 0 on rows not needed."""
  # 2. Compact the candidates (id order).
  cand_ids, cand_real = _compact((z_nv >= lo_n[:, None]) & rows_n[:, None], capacity)
  cand_z = jnp.take_along_axis(z_nv, cand_ids, axis=-1)
  # 3. The k-th largest candidate key T per row (unsigned keys in XLA:CPU TopK's order: −0.0 < 0.0), then every
  #    candidate above T and, of those equal to T, the lowest ids (candidates are in id order, so the first ones).
  key = jax.lax.bitcast_convert_type(_order_keys(cand_z), jnp.uint32) ^ jnp.uint32(0x80000000)
  key = jnp.where(cand_real, key, jnp.uint32(0))
  t, count_t = _threshold_key(key, cand_real, k)
  at_least = cand_real & (key >= t[:, None])

  def split_ties(at_least):  # some row has more than k keys ≥ T: ties at T beyond the k-th, keep the lowest ids
    above = cand_real & (key > t[:, None])
    need = k - jnp.sum(above.astype(jnp.int32), axis=-1)
    tie = at_least & ~above
    return above | (tie & (jnp.cumsum(tie.astype(jnp.int32), axis=-1) <= need[:, None]))

  take = jax.lax.cond(jnp.any(rows_n & (count_t > k)), split_ties, lambda a: a, at_least)
  # 4. Compact the k taken candidates.
  pick, real = _compact(take, k)
  ids = jnp.where(real, jnp.take_along_axis(cand_ids, pick, axis=-1), jnp.arange(k, dtype=jnp.int32)[None, :])
  values = jnp.where(real, jnp.take_along_axis(cand_z, pick, axis=-1), jnp.zeros((), z_nv.dtype))
  return values, ids


def top_k_set(x: Array, k: int, *, where: Array | None = None, enabled: bool | None = None,
              capacity: int = 128, max_bisection_steps: int = 12) -> tuple[Array, Array]:
  """The k largest entries of the last axis as a SET: the same (value, id) pairs as ``jax.lax.top_k`` (ties by lower
  id), in an unspecified order (ascending id on the CPU path, descending value otherwise).

  CAPO's statistics are sums over the top-K, so they need the set, not its order, and on XLA:CPU sorting the k
  entries of every row is most of ``top_k``'s time. The CPU path (``enabled``; default: CPU backend, float32 and
  V ≥ 4·k) selects instead, with only vectorised passes:

    1. lower bound lo ≤ k-th largest by bisection on group maxima (``_top_k_group_bound``), then — only if some
       row still has more than ``capacity`` candidates x ≥ lo — bisection steps on [lo, row max] over the whole rows
       that keep #{x ≥ lo} ≥ k (a ``while_loop``, ≤ ``max_bisection_steps``);
    2. the candidates' ids, compacted to ``capacity`` columns in id order (``_compact``, bit-packed select);
    3. the k-th largest candidate T per row, by bisection on order-preserving uint32 keys in XLA:CPU TopK's float
       order (−0.0 < 0.0) — a ``while_loop`` of passes over [N, capacity] that stops once every row has exactly k
       keys ≥ its lower end (``_threshold_key``); the candidates > T and, of those equal to T, the lowest ids;
    4. those k candidates, compacted again.

  If any needed row still has more than ``capacity`` candidates (heavy ties) or holds a NaN, the whole call takes
  the exact ``top_k`` instead (``lax.cond``; under ``vmap`` both branches run). ``where``: as in ``top_k`` — rows
  not needed get ids 0…k−1 and values 0.
  """
  v = x.shape[-1]
  if not (_use_cpu_path(v, k, enabled, min_ratio=4) and x.dtype == jnp.float32 and capacity >= k):
    return top_k(x, k, where=where, prefilter=enabled)
  lead = x.shape[:-1]
  z = x.reshape(-1, v)
  n = z.shape[0]
  rows = jnp.ones((n,), bool) if where is None else jnp.broadcast_to(where, lead).reshape(-1)

  # 1. Candidates: lo ≤ k-th largest with #{z ≥ lo} ≤ capacity on every needed row.
  lo, hi = _top_k_group_bound(z, k)
  # Rows with a NaN take the exact path (lax.top_k ranks NaN first). The row sum is NaN then (and also for rows
  # holding both ±∞, which merely take the exact path too): one cheap pass instead of an isnan reduction.
  has_nan = jnp.isnan(jnp.sum(z, axis=-1))
  count = _count_at_least(z, lo)

  def too_many(c):  # NaN rows take the exact path anyway: they do not keep the loop going
    return jnp.any(rows & ~has_nan & (c[3] > capacity)) & (c[0] < max_bisection_steps)

  def bisect(c):
    i, lo, hi, count = c
    mid = lo + 0.5 * (hi - lo)
    count_mid = _count_at_least(z, mid)
    enough = count_mid >= k
    return (i + 1, jnp.where(enough, mid, lo), jnp.where(enough, hi, mid), jnp.where(enough, count_mid, count))

  _, lo, _, count = jax.lax.while_loop(too_many, bisect, (jnp.int32(0), lo, hi, count))
  fits = jnp.all(~rows | ((count >= k) & (count <= capacity) & ~has_nan))

  def exact(z):
    values, ids = top_k(z, k, where=rows, prefilter=True)
    return values, ids.astype(jnp.int32)

  values, ids = jax.lax.cond(fits, lambda z: _select_top_k(z, lo, rows, k, capacity), exact, z)
  return values.reshape(*lead, k), ids.reshape(*lead, k)

