// Tests of kvc/evict/d2o.hpp: hand-checked merges (EMA threshold, zero keys, negative
// weights), a float64 re-implementation of D2O's merge over several compressions through a
// real KvCache (kept sets equal to the Base's run side by side), invariants, composition with
// planners, quantizers and fork, and the forwarded optional roles.
#include <kvc/evict/d2o.hpp>

#include <kvc/budget/ada_kv.hpp>
#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/key_diff.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/streaming_llm.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/q8_0.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <vector>

namespace {

using kvc::Position;
using kvc::SequenceId;
using kvc::evict::D2O;
using kvc::evict::H2O;
using kvc::evict::Knorm;
using kvc::evict::SnapKV;
using kvc::evict::StreamingLLM;
using kvc::test::random_tensor;
using kvc::test::Tensor3;

// The optional roles follow Base.
static_assert(kvc::EvictionScorer<D2O<>>);
static_assert(kvc::MergesEvicted<D2O<>>);
static_assert(kvc::ConsumesAttention<D2O<H2O>>);
static_assert(!kvc::ObservesQueries<D2O<H2O>>);
static_assert(kvc::ObservesQueries<D2O<SnapKV>>);
static_assert(!kvc::ConsumesAttention<D2O<SnapKV>>);
static_assert(!kvc::ConsumesAttention<D2O<Knorm>>);
static_assert(!kvc::ObservesQueries<D2O<Knorm>>);
static_assert(kvc::WantsAppendedKeys<D2O<Knorm>>);
static_assert(!kvc::WantsAppendedKeys<D2O<H2O>>);
static_assert(kvc::ScoresStoredKeys<D2O<kvc::evict::KeyDiff>>);
static_assert(!kvc::ScoresStoredKeys<D2O<H2O>>);
static_assert(kvc::ReportsStateBytes<D2O<H2O>>);
static_assert(!kvc::ReportsStateBytes<D2O<StreamingLLM>>);
static_assert(!kvc::MergesEvicted<H2O>);
static_assert(D2O<SnapKV>::name() == "d2o");

using Rows = std::vector<std::vector<double>>;  // [slot][channel]

Tensor3 rows_tensor(const std::vector<std::vector<float>>& rows) {
  Tensor3 tensor(1, rows.size(), rows.front().size());
  for (std::size_t t = 0; t < rows.size(); ++t) {
    for (std::size_t c = 0; c < rows[t].size(); ++c) tensor.at(0, t, c) = rows[t][c];
  }
  return tensor;
}

Rows to_rows(const kvc::DenseLayer::Matrix& matrix) {
  Rows rows(static_cast<std::size_t>(matrix.rows()),
            std::vector<double>(static_cast<std::size_t>(matrix.cols())));
  for (Eigen::Index i = 0; i < matrix.rows(); ++i) {
    for (Eigen::Index c = 0; c < matrix.cols(); ++c) {
      rows[static_cast<std::size_t>(i)][static_cast<std::size_t>(c)] = matrix(i, c);
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------------------
// D2O's merge written out straight from the notes, in float64, per head.

struct ReferenceThreshold {
  double tau = 0.0;
  std::size_t updates = 0;
};

struct ReferenceMerge {
  std::vector<long> target;   // per slot: the kept slot it merged into, or −1
  std::vector<bool> changed;  // per slot
  std::size_t merged = 0, dropped = 0;
};

double norm(const std::vector<double>& x) {
  double sum = 0;
  for (double v : x) sum += v * v;
  return std::sqrt(sum);
}

// Rewrites the kept rows of keys/values in place; `kept` ascending slots.
ReferenceMerge reference_merge(Rows& keys, Rows& values, const std::vector<std::size_t>& kept,
                               ReferenceThreshold& threshold, double alpha = 0.5,
                               double beta = 0.5) {
  const std::size_t n = keys.size();
  ReferenceMerge result{std::vector<long>(n, -1), std::vector<bool>(n, false)};
  if (kept.empty() || kept.size() >= n) return result;
  std::vector<bool> is_kept(n, false);
  for (std::size_t j : kept) is_kept[j] = true;
  std::vector<double> c(n, 0.0);
  std::vector<long> best(n, -1);
  double sum = 0;
  std::size_t evicted = 0;
  for (std::size_t e = 0; e < n; ++e) {
    if (is_kept[e]) continue;
    ++evicted;
    const double ne = norm(keys[e]);
    double top = -2.0;
    for (std::size_t j : kept) {
      const double nj = norm(keys[j]);
      if (ne == 0 || nj == 0) continue;
      double dot = 0;
      for (std::size_t ch = 0; ch < keys[e].size(); ++ch) dot += keys[e][ch] * keys[j][ch];
      const double cosine = dot / (ne * nj);
      if (cosine > top) {
        top = cosine;
        best[e] = static_cast<long>(j);
      }
    }
    c[e] = best[e] >= 0 ? top : 0.0;
    sum += c[e];
  }
  const double mean = sum / static_cast<double>(evicted);
  threshold.tau = threshold.updates == 0 ? mean : alpha * threshold.tau + beta * mean;
  ++threshold.updates;
  const std::size_t d = keys.front().size();
  Rows key_sum(n, std::vector<double>(d, 0.0)), value_sum = key_sum;
  std::vector<std::size_t> count(n, 0);
  for (std::size_t e = 0; e < n; ++e) {
    if (is_kept[e]) continue;
    if (best[e] < 0 || c[e] < threshold.tau) {
      ++result.dropped;
      continue;
    }
    const auto j = static_cast<std::size_t>(best[e]);
    for (std::size_t ch = 0; ch < d; ++ch) {
      key_sum[j][ch] += c[e] * keys[e][ch];
      value_sum[j][ch] += c[e] * values[e][ch];
    }
    ++count[j];
    result.target[e] = best[e];
    ++result.merged;
  }
  for (std::size_t j : kept) {
    if (count[j] == 0) continue;
    for (std::size_t ch = 0; ch < d; ++ch) {
      keys[j][ch] = (keys[j][ch] + key_sum[j][ch]) / static_cast<double>(1 + count[j]);
      values[j][ch] = (values[j][ch] + value_sum[j][ch]) / static_cast<double>(1 + count[j]);
    }
    result.changed[j] = true;
  }
  return result;
}

double max_abs(const std::vector<double>& row) {
  double m = 0;
  for (double x : row) m = std::max(m, std::abs(x));
  return m;
}

// How far a stored merged row may be from the float64 row: 1e-5 of the row's magnitude for
// fp32 storage, plus the format's rounding (`step` of the row's max |x|) for quantizers.
void require_row_near(const kvc::DenseLayer::Matrix& stored, std::size_t slot,
                      const std::vector<double>& expected, double step) {
  const double tolerance = (1e-5 + step) * std::max(max_abs(expected), 1e-6);
  for (std::size_t c = 0; c < expected.size(); ++c) {
    const double got = stored(static_cast<Eigen::Index>(slot), static_cast<Eigen::Index>(c));
    REQUIRE(std::abs(got - expected[c]) <= tolerance);
  }
}

bool rows_bit_equal(const kvc::DenseLayer::Matrix& a, std::size_t slot_a,
                    const kvc::DenseLayer::Matrix& b, std::size_t slot_b) {
  return std::memcmp(a.row(static_cast<Eigen::Index>(slot_a)).data(),
                     b.row(static_cast<Eigen::Index>(slot_b)).data(),
                     static_cast<std::size_t>(a.cols()) * sizeof(float)) == 0;
}

// One compression checked on every (layer, kv head): `before` and `after` are the D2O
// cache's exports around it, `base_positions` the kept positions of the Base cache run side
// by side. The merge is recomputed in float64 from `before` (the decoded rows the cache's
// merge saw); merged rows must match within `step`, every other kept row is bit-identical.
struct MergeCount {
  std::size_t merged = 0, dropped = 0;
};

template <class Cache>
MergeCount check_compression(const Cache& cache, SequenceId seq,
                             const std::vector<kvc::DenseLayer>& before,
                             const std::vector<kvc::DenseLayer>& after,
                             const std::vector<std::vector<std::vector<Position>>>& base_positions,
                             std::vector<ReferenceThreshold>& thresholds, double step) {
  MergeCount count;
  const std::size_t heads = cache.geometry().kv_heads;
  for (std::size_t layer = 0; layer < before.size(); ++layer) {
    for (std::size_t h = 0; h < heads; ++h) {
      CAPTURE(layer, h);
      const auto& old_positions = before[layer].positions[h];
      const auto& new_positions = after[layer].positions[h];
      REQUIRE(new_positions == base_positions[layer][h]);
      if (new_positions.size() == old_positions.size()) continue;  // not compressed
      std::vector<std::size_t> kept;
      for (Position p : new_positions) {
        kept.push_back(static_cast<std::size_t>(
            std::find(old_positions.begin(), old_positions.end(), p) - old_positions.begin()));
      }
      Rows keys = to_rows(before[layer].keys[h]);
      Rows values = to_rows(before[layer].values[h]);
      ReferenceThreshold& threshold = thresholds[layer * heads + h];
      const ReferenceMerge merge = reference_merge(keys, values, kept, threshold);
      count.merged += merge.merged;
      count.dropped += merge.dropped;
      const auto& state = cache.scorer_state(seq, layer, h);
      REQUIRE(state.updates == threshold.updates);
      REQUIRE(state.threshold == Approx(threshold.tau).margin(1e-6));
      for (std::size_t k = 0; k < kept.size(); ++k) {
        const std::size_t slot = kept[k];
        if (merge.changed[slot]) {
          require_row_near(after[layer].keys[h], k, keys[slot], step);
          require_row_near(after[layer].values[h], k, values[slot], step);
        } else {
          REQUIRE(rows_bit_equal(after[layer].keys[h], k, before[layer].keys[h], slot));
          REQUIRE(rows_bit_equal(after[layer].values[h], k, before[layer].values[h], slot));
        }
      }
    }
  }
  return count;
}

template <class Cache>
std::vector<kvc::DenseLayer> export_all(const Cache& cache, SequenceId seq) {
  std::vector<kvc::DenseLayer> layers;
  for (std::size_t l = 0; l < cache.geometry().layers; ++l) {
    layers.push_back(cache.export_dense(seq, l));
  }
  return layers;
}

template <class Cache>
std::vector<std::vector<std::vector<Position>>> positions_all(const Cache& cache, SequenceId seq) {
  std::vector<std::vector<std::vector<Position>>> result(cache.geometry().layers);
  for (std::size_t l = 0; l < cache.geometry().layers; ++l) {
    for (std::size_t h = 0; h < cache.geometry().kv_heads; ++h) {
      result[l].push_back(cache.positions(seq, l, h));
    }
  }
  return result;
}

}  // namespace

TEST_CASE("D2O on a hand-checked case: merges above the EMA threshold, drops below", "[d2o]") {
  // d = 2, StreamingLLM with one sink, budget 3, explicit compress().
  // Step 1: tokens 0..4, kept {0 (sink), 3, 4}, evicted {1, 2}.
  //   k0 = (2, 0), k3 = (0, 1), k4 = (−1, 0); k1 = (3, 4), k2 = (3, −4).
  //   c1 = max(cos(k1,k0)=0.6, cos(k1,k3)=0.8, cos(k1,k4)=−0.6) = 0.8 → k3
  //   c2 = max(0.6, −0.8, −0.6) = 0.6 → k0
  //   τ₀ = mean = 0.7: token 1 merges into 3 (weight 0.8), token 2 is dropped.
  //   k3 ← (k3 + 0.8·k1)/2 = (1.2, 2.1),  v3 ← ((2, 0) + 0.8·(1, −1))/2 = (1.4, −0.4).
  // Step 2: tokens 5, 6 arrive; kept {0, 5, 6}, evicted {3, 4}.
  //   k5 = (0.4, 0.7) ∥ k3 = (1.2, 2.1): c3 = 1 → k5;  k6 = (−21, 20): c4 = cos(k4, k6) =
  //   21/29 = 0.72414 → k6 (cos(k4, k0) = −1, cos(k4, k5) < 0).
  //   τ₁ = 0.5·0.7 + 0.5·(1 + 21/29)/2 = 0.78103. Token 3 merges (1 ≥ τ₁); token 4 is
  //   dropped: 0.72414 < τ₁, although ≥ τ₀ — the threshold is updated before the test.
  //   k5 ← (k5 + k3)/2 = (0.8, 1.4),  v5 ← ((4, 2) + (1.4, −0.4))/2 = (2.7, 0.8).
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 2};
  using Cache = kvc::KvCache<D2O<StreamingLLM>>;
  Cache cache(geometry,
              {.budget = kvc::Budget::tokens(3), .page_tokens = 2, .auto_compress = false},
              D2O<StreamingLLM>(StreamingLLM({.sink = 1})));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, rows_tensor({{2, 0}, {3, 4}, {3, -4}, {0, 1}, {-1, 0}}).view(),
               rows_tensor({{1, 1}, {1, -1}, {5, 5}, {2, 0}, {0, 3}}).view());
  cache.compress(seq);
  auto dense = cache.export_dense(seq, 0);
  REQUIRE(dense.positions[0] == std::vector<Position>{0, 3, 4});
  const auto& state = cache.scorer_state(seq, 0, 0);
  CHECK(state.threshold == Approx(0.7).epsilon(1e-6));
  CHECK(state.merged == 1);
  // Token 0 was no target (token 2 was dropped): bit-identical; token 4 too.
  CHECK(dense.keys[0](0, 0) == 2.0F);
  CHECK(dense.keys[0](0, 1) == 0.0F);
  CHECK(dense.values[0](0, 0) == 1.0F);
  CHECK(dense.values[0](0, 1) == 1.0F);
  CHECK(dense.keys[0](1, 0) == Approx(1.2).epsilon(1e-6));
  CHECK(dense.keys[0](1, 1) == Approx(2.1).epsilon(1e-6));
  CHECK(dense.values[0](1, 0) == Approx(1.4).epsilon(1e-6));
  CHECK(dense.values[0](1, 1) == Approx(-0.4).epsilon(1e-6));
  CHECK(dense.keys[0](2, 0) == -1.0F);
  CHECK(dense.values[0](2, 1) == 3.0F);

  cache.append(seq, 0, rows_tensor({{0.4F, 0.7F}, {-21, 20}}).view(),
               rows_tensor({{4, 2}, {-1, -1}}).view());
  cache.compress(seq);
  dense = cache.export_dense(seq, 0);
  REQUIRE(dense.positions[0] == std::vector<Position>{0, 5, 6});
  const auto& state2 = cache.scorer_state(seq, 0, 0);
  CHECK(state2.threshold == Approx(0.5 * 0.7 + 0.5 * (1.0 + 21.0 / 29.0) / 2).epsilon(1e-6));
  CHECK(state2.updates == 2);
  CHECK(state2.merged == 2);
  CHECK(dense.keys[0](1, 0) == Approx(0.8).epsilon(1e-6));
  CHECK(dense.keys[0](1, 1) == Approx(1.4).epsilon(1e-6));
  CHECK(dense.values[0](1, 0) == Approx(2.7).epsilon(1e-6));
  CHECK(dense.values[0](1, 1) == Approx(0.8).epsilon(1e-6));
  // Token 6 was no target (token 4 dropped): as appended.
  CHECK(dense.keys[0](2, 0) == -21.0F);
  CHECK(dense.keys[0](2, 1) == 20.0F);
  CHECK(dense.values[0](2, 0) == -1.0F);
  CHECK(dense.values[0](2, 1) == -1.0F);
}

TEST_CASE("D2O on a hand-checked case: zero keys and negative weights", "[d2o]") {
  // Budget 2 with one sink: kept {0 (sink), 4 (newest)}, evicted {1, 2, 3}.
  //   k0 = (0, 0): a zero key is never a target (cos undefined, not 0).
  //   k4 = (1, 0).  k1 = (−5, 12): c1 = −5/13 → k4 (its cosine with k0 would be "0").
  //   k2 = (0, 0): c2 = 0, never merged.  k3 = (−1, 0): c3 = −1 → k4.
  //   τ = (−5/13 + 0 − 1)/3 = −0.46154: token 1 merges with weight −5/13 ≥ τ, token 3
  //   (−1 < τ) and token 2 (a zero key) are dropped. Were token 2 merged with weight 0,
  //   the denominator would be 3.
  //   k4 ← ((1, 0) − 5/13·(−5, 12))/2 = (19/13, −30/13)
  //   v4 ← ((4, 4) − 5/13·(3, −1))/2 = (37/26, 57/26)
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 2};
  kvc::KvCache<D2O<StreamingLLM>> cache(
      geometry, {.budget = kvc::Budget::tokens(2), .page_tokens = 4, .auto_compress = false},
      D2O<StreamingLLM>(StreamingLLM({.sink = 1})));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, rows_tensor({{0, 0}, {-5, 12}, {0, 0}, {-1, 0}, {1, 0}}).view(),
               rows_tensor({{1, 2}, {3, -1}, {7, 7}, {-2, 5}, {4, 4}}).view());
  cache.compress(seq);
  const auto dense = cache.export_dense(seq, 0);
  REQUIRE(dense.positions[0] == std::vector<Position>{0, 4});
  CHECK(cache.scorer_state(seq, 0, 0).threshold == Approx((-5.0 / 13 - 1.0) / 3).epsilon(1e-6));
  CHECK(cache.scorer_state(seq, 0, 0).merged == 1);
  CHECK(dense.keys[0](0, 0) == 0.0F);
  CHECK(dense.keys[0](0, 1) == 0.0F);
  CHECK(dense.values[0](0, 0) == 1.0F);
  CHECK(dense.values[0](0, 1) == 2.0F);
  CHECK(dense.keys[0](1, 0) == Approx(19.0 / 13).epsilon(1e-6));
  CHECK(dense.keys[0](1, 1) == Approx(-30.0 / 13).epsilon(1e-6));
  CHECK(dense.values[0](1, 0) == Approx(37.0 / 26).epsilon(1e-6));
  CHECK(dense.values[0](1, 1) == Approx(57.0 / 26).epsilon(1e-6));
}

TEST_CASE("D2O merged rows stay within the rows they combine, even near the f16 limit", "[d2o]") {
  // Everything evicted points away from the one kept key, so τ < 0 and the merged weights
  // are negative; components near ±65504 must not overflow f16 after the merge.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 2};
  kvc::KvCache<D2O<StreamingLLM>, kvc::quant::Dense<Eigen::half>> cache(
      geometry, {.budget = kvc::Budget::tokens(1), .page_tokens = 4, .auto_compress = false},
      D2O<StreamingLLM>(StreamingLLM({.sink = 1})));
  const auto seq = cache.open_sequence();
  const float big = 65504.0F;
  cache.append(
      seq, 0,
      rows_tensor({{big, 0},
                   {-big * 0.2F, big},
                   {-big, big * 0.1F},
                   {-big, -big * 0.5F},
                   {-big * 0.1F, -big}})
          .view(),
      rows_tensor({{big, -big}, {-big, big}, {-big, -big}, {big, big}, {-big, big}}).view());
  const auto before = cache.export_dense(seq, 0);
  cache.compress(seq);
  const auto after = cache.export_dense(seq, 0);
  REQUIRE(after.positions[0] == std::vector<Position>{0});
  Rows keys = to_rows(before.keys[0]), values = to_rows(before.values[0]);
  ReferenceThreshold threshold;
  const auto merge = reference_merge(keys, values, {0}, threshold);
  REQUIRE(threshold.tau < 0);
  REQUIRE(merge.merged >= 2);  // tokens with negative weights were merged
  REQUIRE(merge.dropped >= 1);
  for (std::size_t c = 0; c < 2; ++c) {
    const float k = after.keys[0](0, static_cast<Eigen::Index>(c));
    const float v = after.values[0](0, static_cast<Eigen::Index>(c));
    CHECK(std::isfinite(k));
    CHECK(std::isfinite(v));
    CHECK(std::abs(k) <= big);
    CHECK(std::abs(v) <= big);
    // f16 rounding: 2^-11 relative.
    CHECK(k == Approx(keys[0][c]).epsilon(1e-3).margin(1e-3 * big));
    CHECK(v == Approx(values[0][c]).epsilon(1e-3).margin(1e-3 * big));
  }

  // The extreme case by hand: every evicted key is −k0, so c_e = −1 = τ and all merge with
  // weight −1; k0 ← (k0 + 3·k0)/4 = k0 and v0 ← (v0 + 3·v0)/4 = v0, exactly at f16's max.
  const auto seq2 = cache.open_sequence();
  cache.append(seq2, 0, rows_tensor({{big, 0}, {-big, 0}, {-big, 0}, {-big, 0}}).view(),
               rows_tensor({{big, -big}, {-big, big}, {-big, big}, {-big, big}}).view());
  cache.compress(seq2);
  const auto extreme = cache.export_dense(seq2, 0);
  CHECK(cache.scorer_state(seq2, 0, 0).threshold == -1.0);
  CHECK(cache.scorer_state(seq2, 0, 0).merged == 3);
  CHECK(extreme.keys[0](0, 0) == big);
  CHECK(extreme.keys[0](0, 1) == 0.0F);
  CHECK(extreme.values[0](0, 0) == big);
  CHECK(extreme.values[0](0, 1) == -big);
}

namespace {

// The cache against a fully independent float64 D2O (its own K/V rows, appended from the
// host's inputs and merged in double) over several compressions, with kept sets taken from
// a KvCache<Base> run side by side. Base's kept set must not depend on the merged contents:
// Knorm scores the host's appended keys; H2O keeps its prefill attention (no decode attend).
template <class Base>
void run_against_independent_reference(Base base, bool attend_prefill) {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  const std::size_t d = geometry.head_dim;
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(12), .page_tokens = 4, .auto_compress = false};
  kvc::KvCache<D2O<Base>> cache(geometry, options, D2O<Base>(base));
  kvc::KvCache<Base> base_cache(geometry, options, base);
  const auto seq = cache.open_sequence();
  const auto base_seq = base_cache.open_sequence();
  std::mt19937 rng(7);

  struct Head {
    std::vector<Position> positions;
    Rows keys, values;
    ReferenceThreshold threshold;
  };
  std::vector<Head> reference(geometry.layers * geometry.kv_heads);
  std::size_t seen = 0, merged = 0, dropped = 0;

  const auto step = [&](std::size_t count, bool attend) {
    for (std::size_t l = 0; l < geometry.layers; ++l) {
      const Tensor3 k = random_tensor(rng, geometry.kv_heads, count, d);
      const Tensor3 v = random_tensor(rng, geometry.kv_heads, count, d);
      cache.append(seq, l, k.view(), v.view());
      base_cache.append(base_seq, l, k.view(), v.view());
      if (attend) {
        const Tensor3 q = random_tensor(rng, geometry.q_heads, count, d);
        Tensor3 out(geometry.q_heads, count, d);
        cache.attend(seq, l, q.view(), out.mutable_view());
        base_cache.attend(base_seq, l, q.view(), out.mutable_view());
      }
      for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
        Head& head = reference[l * geometry.kv_heads + h];
        for (std::size_t t = 0; t < count; ++t) {
          head.positions.push_back(static_cast<Position>(seen + t));
          std::vector<double> key(d), value(d);
          for (std::size_t c = 0; c < d; ++c) {
            key[c] = k.at(h, t, c);
            value[c] = v.at(h, t, c);
          }
          head.keys.push_back(key);
          head.values.push_back(value);
        }
      }
    }
    seen += count;
    cache.compress(seq);
    base_cache.compress(base_seq);
    for (std::size_t l = 0; l < geometry.layers; ++l) {
      const auto dense = cache.export_dense(seq, l);
      for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
        CAPTURE(seen, l, h);
        Head& head = reference[l * geometry.kv_heads + h];
        const auto kept_positions = base_cache.positions(base_seq, l, h);
        REQUIRE(dense.positions[h] == kept_positions);
        if (kept_positions.size() < head.positions.size()) {
          std::vector<std::size_t> kept;
          for (Position p : kept_positions) {
            kept.push_back(static_cast<std::size_t>(
                std::find(head.positions.begin(), head.positions.end(), p) -
                head.positions.begin()));
          }
          const auto merge = reference_merge(head.keys, head.values, kept, head.threshold);
          merged += merge.merged;
          dropped += merge.dropped;
          Head compacted{kept_positions, {}, {}, head.threshold};
          for (std::size_t slot : kept) {
            compacted.keys.push_back(head.keys[slot]);
            compacted.values.push_back(head.values[slot]);
          }
          head = compacted;
        }
        const auto& state = cache.scorer_state(seq, l, h);
        REQUIRE(state.updates == head.threshold.updates);
        REQUIRE(state.threshold == Approx(head.threshold.tau).margin(1e-6));
        for (std::size_t i = 0; i < head.keys.size(); ++i) {
          require_row_near(dense.keys[h], i, head.keys[i], 0.0);
          require_row_near(dense.values[h], i, head.values[i], 0.0);
        }
      }
    }
  };

  step(30, attend_prefill);                                              // prefill: 30 → 12
  for (std::size_t s = 0; s < 12; ++s) step(s % 4 == 3 ? 3 : 1, false);  // decode
  // The threshold evolved over 13 compressions, and both outcomes happened many times.
  CHECK(reference.front().threshold.updates == 13);
  CHECK(merged > 20);
  CHECK(dropped > 20);
}

}  // namespace

TEST_CASE("D2O<Knorm> matches a float64 re-implementation over many compressions", "[d2o]") {
  run_against_independent_reference(Knorm{}, false);
}

TEST_CASE("D2O<H2O> matches a float64 re-implementation over many compressions", "[d2o]") {
  run_against_independent_reference(H2O({.recent_tokens = 4}), true);
}

TEST_CASE("D2O keeps the budget through decode and holds the bytes its Base holds", "[d2o]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 32};
  std::mt19937 rng(11);
  const kvc::CacheOptions options{.budget = kvc::Budget::tokens(24), .page_tokens = 8};
  kvc::KvCache<D2O<>> cache(geometry, options);
  kvc::KvCache<H2O> base(geometry, options);
  kvc::KvCache<> full(geometry, {.page_tokens = 8});
  const auto seq = cache.open_sequence();
  const auto base_seq = base.open_sequence();
  const auto full_seq = full.open_sequence();
  const auto run = [&](std::size_t count) {
    for (std::size_t l = 0; l < geometry.layers; ++l) {
      const Tensor3 k = random_tensor(rng, 2, count, 32);
      const Tensor3 v = random_tensor(rng, 2, count, 32);
      const Tensor3 q = random_tensor(rng, 8, count, 32);
      Tensor3 out(8, count, 32);
      cache.append(seq, l, k.view(), v.view());
      base.append(base_seq, l, k.view(), v.view());
      full.append(full_seq, l, k.view(), v.view());
      cache.attend(seq, l, q.view(), out.mutable_view());
      for (float x : out.data) REQUIRE(std::isfinite(x));
      base.attend(base_seq, l, q.view(), out.mutable_view());
      full.attend(full_seq, l, q.view(), out.mutable_view());
      for (std::size_t h = 0; h < 2; ++h) REQUIRE(cache.tokens(seq, l, h) <= 24);
    }
  };
  run(100);
  for (int s = 0; s < 40; ++s) run(1);
  const auto stats = cache.stats();
  const auto base_stats = base.stats();
  const auto full_stats = full.stats();
  CHECK(stats.scorer == "d2o");
  CHECK(stats.tokens_stored == 2 * 2 * 24);
  CHECK(stats.page_bytes == base_stats.page_bytes);
  CHECK(stats.page_bytes * 4 < full_stats.page_bytes);
  CHECK(stats.bytes_held() < full_stats.bytes_held() / 3);
  std::size_t merged = 0;
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h) {
      const auto& state = cache.scorer_state(seq, l, h);
      merged += state.merged;
      CHECK(state.updates == 41);  // the prefill compression and one per decode step
      CHECK(cache.scorer().state_bytes(state) == H2O{}.state_bytes(state.base));
    }
  }
  CHECK(merged > 0);
}

TEST_CASE("D2O: dropped tokens have no effect and untouched kept rows stay bit-identical",
          "[d2o]") {
  // Two caches with the same keys; the values differ only at tokens the float64 reference
  // drops. After compression both hold exactly the same bytes.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 32};
  std::mt19937 rng(13);
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(10), .page_tokens = 4, .auto_compress = false};
  kvc::KvCache<D2O<Knorm>, kvc::quant::Int8<>> a(geometry, options);
  kvc::KvCache<D2O<Knorm>, kvc::quant::Int8<>> b(geometry, options);
  kvc::KvCache<Knorm, kvc::quant::Int8<>> base(geometry, options);
  const Tensor3 k = random_tensor(rng, 2, 40, 32);
  const Tensor3 v = random_tensor(rng, 2, 40, 32);
  const auto seq_a = a.open_sequence();
  const auto base_seq = base.open_sequence();
  a.append(seq_a, 0, k.view(), v.view());
  base.append(base_seq, 0, k.view(), v.view());
  const auto before = export_all(a, seq_a);
  base.compress(base_seq);
  a.compress(seq_a);
  std::vector<ReferenceThreshold> thresholds(2);
  const auto count = check_compression(a, seq_a, before, export_all(a, seq_a),
                                       positions_all(base, base_seq), thresholds, 0.6 / 127);
  REQUIRE(count.merged > 0);
  REQUIRE(count.dropped > 0);

  // Which tokens were dropped: replay the reference on `before`.
  Tensor3 v_changed = v;
  std::size_t changed_tokens = 0;
  for (std::size_t h = 0; h < 2; ++h) {
    Rows keys = to_rows(before[0].keys[h]), values = to_rows(before[0].values[h]);
    std::vector<std::size_t> kept;
    const auto positions = base.positions(base_seq, 0, h);
    for (Position p : positions) kept.push_back(static_cast<std::size_t>(p));
    ReferenceThreshold threshold;
    const auto merge = reference_merge(keys, values, kept, threshold);
    for (std::size_t t = 0; t < 40; ++t) {
      const bool is_kept = std::find(kept.begin(), kept.end(), t) != kept.end();
      if (is_kept || merge.target[t] >= 0) continue;
      for (std::size_t c = 0; c < 32; ++c) v_changed.at(h, t, c) = -3.0F * v.at(h, t, c) + 1.0F;
      ++changed_tokens;
    }
  }
  REQUIRE(changed_tokens == count.dropped);
  const auto seq_b = b.open_sequence();
  b.append(seq_b, 0, k.view(), v_changed.view());
  b.compress(seq_b);
  const auto dense_a = a.export_dense(seq_a, 0);
  const auto dense_b = b.export_dense(seq_b, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(dense_a.positions[h] == dense_b.positions[h]);
    for (std::size_t i = 0; i < dense_a.positions[h].size(); ++i) {
      CHECK(rows_bit_equal(dense_a.keys[h], i, dense_b.keys[h], i));
      CHECK(rows_bit_equal(dense_a.values[h], i, dense_b.values[h], i));
    }
  }
}

namespace {

// D2O<H2O> in a cache with `Quant` and `Planner` against the float64 merge of the decoded
// rows, with a KvCache<H2O, Quant, ..., Planner> side by side: prefill attended, then
// decode appends compressed without attention (the kept sets stay Base's own).
template <class Quant, class Planner>
void run_composed(Planner planner, std::size_t layers, double step) {
  const kvc::Geometry geometry{.layers = layers, .q_heads = 8, .kv_heads = 4, .head_dim = 32};
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(16), .page_tokens = 8, .auto_compress = false};
  using Cache =
      kvc::KvCache<D2O<H2O>, Quant, kvc::retrieval::Exhaustive, kvc::offload::None, Planner>;
  using BaseCache =
      kvc::KvCache<H2O, Quant, kvc::retrieval::Exhaustive, kvc::offload::None, Planner>;
  Cache cache(geometry, options, {}, {}, {}, {}, planner);
  BaseCache base(geometry, options, {}, {}, {}, {}, planner);
  const auto seq = cache.open_sequence();
  const auto base_seq = base.open_sequence();
  std::mt19937 rng(17);
  std::vector<ReferenceThreshold> thresholds(layers * geometry.kv_heads);
  MergeCount total;
  std::set<std::size_t> sizes;
  for (std::size_t s = 0; s < 8; ++s) {
    const std::size_t count = s == 0 ? 64 : 2;
    for (std::size_t l = 0; l < layers; ++l) {
      const Tensor3 k = random_tensor(rng, 4, count, 32);
      const Tensor3 v = random_tensor(rng, 4, count, 32);
      cache.append(seq, l, k.view(), v.view());
      base.append(base_seq, l, k.view(), v.view());
      if (s == 0) {
        const Tensor3 q = random_tensor(rng, 8, count, 32);
        Tensor3 out(8, count, 32);
        cache.attend(seq, l, q.view(), out.mutable_view());
        base.attend(base_seq, l, q.view(), out.mutable_view());
      }
    }
    const auto before = export_all(cache, seq);
    cache.compress(seq);
    base.compress(base_seq);
    const auto after = export_all(cache, seq);
    const auto count_step = check_compression(cache, seq, before, after,
                                              positions_all(base, base_seq), thresholds, step);
    total.merged += count_step.merged;
    total.dropped += count_step.dropped;
    for (const auto& layer : after) {
      for (const auto& positions : layer.positions) sizes.insert(positions.size());
    }
  }
  CHECK(total.merged > 10);
  CHECK(total.dropped > 10);
  CHECK(sizes.size() > 1);  // the planner gave heads or layers different budgets
}

}  // namespace

TEST_CASE("D2O<H2O> composes with PyramidKV budgets", "[d2o]") {
  run_composed<kvc::quant::Dense<float>>(kvc::budget::PyramidKV({.window = 4, .beta = 4}), 4, 0.0);
}

TEST_CASE("D2O<H2O> composes with AdaKV budgets", "[d2o]") {
  run_composed<kvc::quant::Dense<float>>(kvc::budget::AdaKV{}, 2, 0.0);
}

TEST_CASE("D2O<H2O> re-encodes merged rows into Int8 and Q8_0 within their rounding", "[d2o]") {
  // Int8: |x − x̂| ≤ max|x|/254; Q8_0: ≤ ~0.56 · amax/127 per 32-block.
  run_composed<kvc::quant::Int8<>>(kvc::budget::PyramidKV({.window = 4, .beta = 4}), 2, 0.5 / 127);
  run_composed<kvc::quant::Q8_0>(kvc::budget::AdaKV{}, 2, 0.6 / 127);
}

TEST_CASE("D2O merging in a fork copies shared pages and leaves the parent as it was", "[d2o]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 32};
  std::mt19937 rng(19);
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(12), .page_tokens = 4, .auto_compress = false};
  kvc::KvCache<D2O<>, kvc::quant::Q8_0> cache(geometry, options);
  kvc::KvCache<H2O, kvc::quant::Q8_0> base(geometry, options);
  const auto parent = cache.open_sequence();
  const auto base_seq = base.open_sequence();
  for (std::size_t l = 0; l < 2; ++l) {
    const Tensor3 k = random_tensor(rng, 2, 40, 32);
    const Tensor3 v = random_tensor(rng, 2, 40, 32);
    const Tensor3 q = random_tensor(rng, 4, 40, 32);
    Tensor3 out(4, 40, 32);
    cache.append(parent, l, k.view(), v.view());
    cache.attend(parent, l, q.view(), out.mutable_view());
    base.append(base_seq, l, k.view(), v.view());
    base.attend(base_seq, l, q.view(), out.mutable_view());
  }
  const auto parent_before = export_all(cache, parent);
  const auto pages_before = cache.stats().pages_in_use;
  const auto child = cache.fork(parent);
  CHECK(cache.stats().pages_in_use == pages_before);  // nothing copied yet

  cache.compress(child);
  base.compress(base_seq);
  std::vector<ReferenceThreshold> thresholds(4);
  const auto count = check_compression(cache, child, parent_before, export_all(cache, child),
                                       positions_all(base, base_seq), thresholds, 0.6 / 127);
  REQUIRE(count.merged > 0);

  // The parent: same positions, same bytes, untouched threshold.
  const auto parent_after = export_all(cache, parent);
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h) {
      REQUIRE(parent_after[l].positions[h] == parent_before[l].positions[h]);
      for (std::size_t i = 0; i < parent_before[l].positions[h].size(); ++i) {
        REQUIRE(rows_bit_equal(parent_after[l].keys[h], i, parent_before[l].keys[h], i));
        REQUIRE(rows_bit_equal(parent_after[l].values[h], i, parent_before[l].values[h], i));
      }
      CHECK(cache.scorer_state(parent, l, h).updates == 0);
      CHECK(cache.scorer_state(child, l, h).updates == 1);
    }
  }

  // Compressing the parent now gives what the child got, and leaves the child alone.
  const auto child_before = export_all(cache, child);
  cache.compress(parent);
  const auto parent_compressed = export_all(cache, parent);
  const auto child_after = export_all(cache, child);
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h) {
      REQUIRE(parent_compressed[l].positions[h] == child_before[l].positions[h]);
      REQUIRE(child_after[l].positions[h] == child_before[l].positions[h]);
      for (std::size_t i = 0; i < child_before[l].positions[h].size(); ++i) {
        REQUIRE(rows_bit_equal(parent_compressed[l].keys[h], i, child_before[l].keys[h], i));
        REQUIRE(rows_bit_equal(parent_compressed[l].values[h], i, child_before[l].values[h], i));
        REQUIRE(rows_bit_equal(child_after[l].keys[h], i, child_before[l].keys[h], i));
        REQUIRE(rows_bit_equal(child_after[l].values[h], i, child_before[l].values[h], i));
      }
    }
  }
}

TEST_CASE("D2O<SnapKV> observes queries and keeps SnapKV's tokens", "[d2o]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  std::mt19937 rng(23);
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(16), .page_tokens = 8, .auto_compress = false};
  const SnapKV snap({.window = 4, .kernel = 3});
  kvc::KvCache<D2O<SnapKV>> cache(geometry, options,
                                  D2O<SnapKV>(snap, {.alpha = 0.3, .beta = 0.7}));
  kvc::KvCache<SnapKV> base(geometry, options, snap);
  const auto seq = cache.open_sequence();
  const auto base_seq = base.open_sequence();
  CHECK(cache.scorer().options().alpha == 0.3);
  CHECK(cache.scorer().base().options().window == 4);
  const Tensor3 k = random_tensor(rng, 2, 48, 16);
  const Tensor3 v = random_tensor(rng, 2, 48, 16);
  const Tensor3 window = random_tensor(rng, 4, 4, 16);
  cache.append(seq, 0, k.view(), v.view());
  base.append(base_seq, 0, k.view(), v.view());
  cache.observe(seq, 0, window.view());
  base.observe(base_seq, 0, window.view());
  const auto before = cache.export_dense(seq, 0);
  cache.compress(seq);
  base.compress(base_seq);
  const auto after = cache.export_dense(seq, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    CAPTURE(h);
    REQUIRE(after.positions[h] == base.positions(base_seq, 0, h));
    // Not simply the newest 16: the observed scores chose.
    CHECK(after.positions[h].front() < 32);
    std::vector<std::size_t> kept;
    for (Position p : after.positions[h]) kept.push_back(static_cast<std::size_t>(p));
    Rows keys = to_rows(before.keys[h]), values = to_rows(before.values[h]);
    ReferenceThreshold threshold;
    const auto merge = reference_merge(keys, values, kept, threshold, 0.3, 0.7);
    CHECK(merge.merged > 0);
    CHECK(cache.scorer_state(seq, 0, h).threshold == Approx(threshold.tau).margin(1e-6));
    for (std::size_t i = 0; i < kept.size(); ++i) {
      require_row_near(after.keys[h], i, keys[kept[i]], 0.0);
      require_row_near(after.values[h], i, values[kept[i]], 0.0);
    }
  }
}

TEST_CASE("D2O<Knorm> runs through attend with auto-compression", "[d2o]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 16};
  std::mt19937 rng(29);
  kvc::KvCache<D2O<Knorm>> cache(geometry, {.budget = kvc::Budget::tokens(8), .page_tokens = 4});
  kvc::KvCache<Knorm> base(geometry, {.budget = kvc::Budget::tokens(8), .page_tokens = 4});
  const auto seq = cache.open_sequence();
  const auto base_seq = base.open_sequence();
  for (int s = 0; s < 20; ++s) {
    const Tensor3 k = random_tensor(rng, 1, 2, 16);
    const Tensor3 v = random_tensor(rng, 1, 2, 16);
    const Tensor3 q = random_tensor(rng, 2, 2, 16);
    Tensor3 out(2, 2, 16);
    cache.append(seq, 0, k.view(), v.view());
    cache.attend(seq, 0, q.view(), out.mutable_view());
    base.append(base_seq, 0, k.view(), v.view());
    base.attend(base_seq, 0, q.view(), out.mutable_view());
    REQUIRE(cache.positions(seq, 0, 0) == base.positions(base_seq, 0, 0));
  }
  CHECK(cache.scorer_state(seq, 0, 0).updates == 20 - 4);  // from the 5th step on
  CHECK(cache.scorer_state(seq, 0, 0).merged > 0);
}

TEST_CASE("D2O rejects a non-finite alpha or beta", "[d2o]") {
  CHECK_THROWS_AS(D2O<>({.alpha = std::nan("")}), kvc::UnsupportedError);
  CHECK_THROWS_AS(D2O<>({.beta = INFINITY}), kvc::UnsupportedError);
}
