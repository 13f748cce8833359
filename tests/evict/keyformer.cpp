// Tests of kvc/evict/keyformer.hpp: hand-checked accumulations (noise off: H2O at τ = 1,
// the τ-scaled softmax, pooled rows), the temperature schedule, the Gumbel noise, a float64
// re-implementation through prefill and decode, decode invariants and bytes, and the
// composition with PyramidKV and Int8.
#include <kvc/evict/keyformer.hpp>

#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/quant/int8.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::Keyformer;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using KeyformerCache = kvc::KvCache<Keyformer>;

static_assert(kvc::EvictionScorer<Keyformer>);
static_assert(kvc::ConsumesAttention<Keyformer>);
static_assert(!kvc::ObservesQueries<Keyformer>);
static_assert(kvc::ReportsStateBytes<Keyformer>);

double harmonic(std::size_t n) {
  double sum = 0;
  for (std::size_t i = 1; i <= n; ++i) sum += 1.0 / static_cast<double>(i);
  return sum;
}

// Keyformer in float64, as kvc documents it: per attend, the exact softmax of every query
// row of the group (pooled: summed), then f += R·softmax((log(w/R) + G)/τ_t), with G from
// Keyformer::gumbel (the noise is an input here, like the random K/V); eviction keeps the
// recent window and the largest f.
struct ReferenceKeyformer {
  Keyformer::Options options;
  std::size_t budget, recent, dim, group, layer, kv_head;
  std::vector<Position> positions;
  std::vector<std::vector<float>> keys;
  std::vector<double> accumulated;
  std::uint64_t steps = 0;

  void append(const Tensor3& k, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<Position>(first + t));
      keys.emplace_back(
          k.data.begin() + static_cast<std::ptrdiff_t>((kv_head * k.tokens + t) * dim),
          k.data.begin() + static_cast<std::ptrdiff_t>((kv_head * k.tokens + t + 1) * dim));
      accumulated.push_back(0.0);
    }
  }
  void attend(const Tensor3& q, std::size_t seen) {
    std::vector<float> flat;
    for (const auto& key : keys) flat.insert(flat.end(), key.begin(), key.end());
    std::vector<double> w(positions.size(), 0.0);
    for (std::size_t a = 0; a < group; ++a) {
      for (std::size_t t = 0; t < q.tokens; ++t) {
        std::vector<float> query(dim);
        for (std::size_t c = 0; c < dim; ++c) query[c] = q.at(kv_head * group + a, t, c);
        const auto row = kvc::test::reference_weights(
            query, flat.data(), positions, static_cast<Position>(seen - q.tokens + t), dim);
        for (std::size_t i = 0; i < w.size(); ++i) w[i] += row[i];
      }
    }
    const double rows = static_cast<double>(group * q.tokens);
    const double progress = static_cast<double>(std::min<std::uint64_t>(steps, options.tau_steps)) /
                            static_cast<double>(options.tau_steps);
    const double tau = options.tau_init + progress * (options.tau_end - options.tau_init);
    std::vector<double> y(w.size());
    double shift = -INFINITY;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const double g =
          options.noise ? Keyformer::gumbel(options.seed, layer, kv_head, steps, i) : 0.0;
      y[i] = (std::log(w[i] / rows) + g) / tau;
      shift = std::max(shift, y[i]);
    }
    double total = 0;
    for (double& x : y) total += (x = std::exp(x - shift));
    for (std::size_t i = 0; i < w.size(); ++i) accumulated[i] += rows * y[i] / total;
    ++steps;
  }
  void compress() {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    std::vector<std::size_t> order(n - recent);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return accumulated[a] != accumulated[b] ? accumulated[a] > accumulated[b] : a > b;
    });
    std::vector<bool> keep(n, false);
    for (std::size_t i = 0; i < budget - recent; ++i) keep[order[i]] = true;
    for (std::size_t i = n - recent; i < n; ++i) keep[i] = true;
    std::size_t kept = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!keep[i]) continue;
      positions[kept] = positions[i];
      keys[kept] = keys[i];
      accumulated[kept] = accumulated[i];
      ++kept;
    }
    positions.resize(kept);
    keys.resize(kept);
    accumulated.resize(kept);
  }
};

}  // namespace

TEST_CASE("Keyformer without noise at tau 1 accumulates as H2O on a hand-checked case",
          "[keyformer]") {
  // Zero queries attend uniformly: prefill query t gives 1/(t+1) to tokens 0..t, so token i
  // accumulates 2·(H_8 − H_i) over the 2 query heads (pooled rows at τ = 1 without noise
  // are exactly the column sums). Budget 4, recent 2: keep 0, 1 and 6, 7.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(1);
  KeyformerCache cache(geometry, {.budget = kvc::Budget::tokens(4)},
                       Keyformer({.recent_tokens = 2, .tau_end = 1.0, .noise = false}));
  const auto seq = cache.open_sequence();
  Tensor3 out(2, 8, 4);
  cache.append(seq, 0, random_tensor(rng, 1, 8, 4).view(), random_tensor(rng, 1, 8, 4).view());
  cache.attend(seq, 0, Tensor3(2, 8, 4).view(), out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{0, 1, 6, 7});
  const auto& state = cache.scorer_state(seq, 0, 0);
  CHECK(state.steps == 1);
  REQUIRE(state.accumulated.size() == 4);
  CHECK(state.accumulated[0] == Approx(2 * harmonic(8)).epsilon(1e-5));
  CHECK(state.accumulated[1] == Approx(2 * (harmonic(8) - 1)).epsilon(1e-5));
  CHECK(state.accumulated[2] == Approx(2 * (1.0 / 7 + 1.0 / 8)).epsilon(1e-5));
  CHECK(state.accumulated[3] == Approx(2 * (1.0 / 8)).epsilon(1e-5));
}

TEST_CASE("Keyformer's temperature flattens the step's softmax, pooled rows scale it",
          "[keyformer]") {
  // τ: 1 at the prompt, rising by 0.5 per step to 2 after tau_steps = 2.
  const Keyformer schedule({.tau_steps = 2});
  CHECK(schedule.temperature(0) == 1.0);
  CHECK(schedule.temperature(1) == 1.5);
  CHECK(schedule.temperature(2) == 2.0);
  CHECK(schedule.temperature(100) == 2.0);
  CHECK(Keyformer({.tau_steps = 0}).temperature(7) == 1.0);

  // At τ = 2 without noise, weights (0.5, 0.25, 0.25) give softmax(log w / 2) ∝ √w:
  // (0.7071, 0.5, 0.5) / 1.7071. Two pooled rows summing to (1, 0.5, 0.5) give twice that;
  // a token no row saw (weight 0) gets nothing.
  Keyformer scorer({.tau_steps = 2, .noise = false});
  Keyformer::HeadState state{{0, 0, 0, 0}, 2};
  const std::vector<float> one_row{0.5F, 0.25F, 0.25F, 0.0F};
  scorer.on_attention(state, kvc::AttentionEvent{0, 0, one_row, 1});
  const double norm = std::sqrt(0.5) + 1.0;
  CHECK(state.accumulated[0] == Approx(std::sqrt(0.5) / norm));
  CHECK(state.accumulated[1] == Approx(0.5 / norm));
  CHECK(state.accumulated[2] == Approx(0.5 / norm));
  CHECK(state.accumulated[3] == 0.0F);
  CHECK(state.steps == 3);
  Keyformer::HeadState pooled{{0, 0, 0, 0}, 2};
  const std::vector<float> two_rows{1.0F, 0.5F, 0.5F, 0.0F};
  scorer.on_attention(pooled, kvc::AttentionEvent{0, 0, two_rows, 2});
  for (std::size_t i = 0; i < 4; ++i)
    CHECK(pooled.accumulated[i] == Approx(2 * state.accumulated[i]));

  CHECK_THROWS_AS(Keyformer({.tau_init = 0.0}), kvc::UnsupportedError);
  CHECK_THROWS_AS(Keyformer({.recent_fraction = 1.5}), kvc::UnsupportedError);
}

TEST_CASE("Keyformer's Gumbel noise is deterministic, keyed and Gumbel distributed",
          "[keyformer]") {
  CHECK(Keyformer::gumbel(7, 1, 2, 3, 4) == Keyformer::gumbel(7, 1, 2, 3, 4));
  CHECK(Keyformer::gumbel(7, 1, 2, 3, 4) != Keyformer::gumbel(8, 1, 2, 3, 4));
  CHECK(Keyformer::gumbel(7, 1, 2, 3, 4) != Keyformer::gumbel(7, 1, 2, 4, 4));
  CHECK(Keyformer::gumbel(7, 1, 2, 3, 4) != Keyformer::gumbel(7, 1, 2, 3, 5));
  CHECK(Keyformer::gumbel(7, 1, 2, 3, 4) != Keyformer::gumbel(7, 0, 2, 3, 4));
  // Gumbel(0, 1): mean γ = 0.5772, variance π²/6 = 1.6449, P(G ≤ 0) = 1/e.
  constexpr std::size_t samples = 200000;
  double sum = 0, square = 0, below = 0;
  for (std::size_t i = 0; i < samples; ++i) {
    const double g = Keyformer::gumbel(0, 0, 0, i / 1000, i % 1000);
    sum += g;
    square += g * g;
    below += g <= 0 ? 1 : 0;
  }
  const double mean = sum / samples;
  CHECK(mean == Approx(0.5772).margin(0.01));
  CHECK(square / samples - mean * mean == Approx(1.6449).margin(0.03));
  CHECK(below / samples == Approx(std::exp(-1.0)).margin(0.005));

  // Same seed, same kept set; the seed does move the accumulations.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 16};
  std::mt19937 rng(2);
  const Tensor3 k = random_tensor(rng, 1, 40, 16), v = random_tensor(rng, 1, 40, 16);
  const Tensor3 q = random_tensor(rng, 2, 40, 16);
  const auto run = [&](std::uint64_t seed) {
    KeyformerCache cache(geometry, {.budget = kvc::Budget::tokens(20)}, Keyformer({.seed = seed}));
    const auto seq = cache.open_sequence();
    Tensor3 out(2, 40, 16);
    cache.append(seq, 0, k.view(), v.view());
    cache.attend(seq, 0, q.view(), out.mutable_view());
    return cache.scorer_state(seq, 0, 0).accumulated;
  };
  CHECK(run(5) == run(5));
  CHECK(run(5) != run(6));
}

TEST_CASE("Keyformer matches a float64 re-implementation over prefill and decode", "[keyformer]") {
  const std::size_t group = GENERATE(1, 4);
  const bool noise = GENERATE(true, false);
  const std::size_t budget = GENERATE(16, 33);
  CAPTURE(group, noise, budget);
  constexpr std::size_t dim = 32;
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = dim};
  std::mt19937 rng(static_cast<unsigned>(group * 100 + budget + (noise ? 1 : 0)));
  const Keyformer::Options options{.tau_steps = 40, .seed = 11, .noise = noise};
  KeyformerCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
                       Keyformer(options));
  const auto seq = cache.open_sequence();
  std::vector<ReferenceKeyformer> reference;
  for (std::size_t h = 0; h < 2; ++h) {
    reference.push_back(ReferenceKeyformer{
        options, budget, Keyformer(options).recent_for(budget), dim, group, 0, h, {}, {}, {}, 0});
  }
  std::vector<std::size_t> chunks{50, 30};  // a chunked prompt: the first chunk is over budget
  chunks.insert(chunks.end(), 60, 1);
  std::size_t seen = 0;
  for (const std::size_t n : chunks) {
    const Tensor3 k = random_tensor(rng, 2, n, dim);
    const Tensor3 q = random_tensor(rng, 2 * group, n, dim, 1.5F);
    Tensor3 out(2 * group, n, dim);
    cache.append(seq, 0, k.view(), random_tensor(rng, 2, n, dim).view());
    cache.attend(seq, 0, q.view(), out.mutable_view());
    seen += n;
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(seen, h);
      reference[h].append(k, seen - n);
      reference[h].attend(q, seen);
      reference[h].compress();
      REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
      const auto& accumulated = cache.scorer_state(seq, 0, h).accumulated;
      for (std::size_t i = 0; i < accumulated.size(); ++i) {
        REQUIRE(accumulated[i] == Approx(reference[h].accumulated[i]).epsilon(1e-4).margin(1e-6));
      }
    }
  }
}

TEST_CASE("Keyformer through decode: recent kept, budget held, bytes freed", "[keyformer]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  constexpr std::size_t prompt = 256, budget = 80;
  KeyformerCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16});
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  const std::size_t recent = Keyformer().recent_for(budget);
  CHECK(recent == 24);
  for (std::size_t step = 0; step <= 30; ++step) {
    const std::size_t n = step == 0 ? prompt : 1;
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 2, n, 64), v = random_tensor(rng, 2, n, 64);
      Tensor3 out(8, n, 64);
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, random_tensor(rng, 8, n, 64).view(), out.mutable_view());
      full.append(full_seq, l, k.view(), v.view());
      const auto seen = static_cast<Position>(cache.tokens_seen(seq, l));
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        REQUIRE(positions.size() == budget);
        REQUIRE(positions.back() == seen - 1);
        REQUIRE(positions[budget - recent] == seen - static_cast<Position>(recent));
        REQUIRE(cache.scorer_state(seq, l, h).steps == step + 1);
      }
    }
  }
  const auto stats = cache.stats();
  const auto full_stats = full.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * (budget / 16));
  CHECK(stats.page_bytes * 3 < full_stats.page_bytes);
  CHECK(stats.metadata_bytes >= stats.tokens_stored * sizeof(float));
  CHECK(stats.bytes_held() < full_stats.bytes_held());
}

TEST_CASE("Keyformer composes with PyramidKV and Int8", "[keyformer]") {
  // The weights come from the int8 keys: the reference runs on the keys the cache stores.
  using Cache = kvc::KvCache<Keyformer, kvc::quant::Int8<>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, kvc::budget::PyramidKV>;
  constexpr std::size_t layers = 4, prompt = 200, dim = 32;
  const kvc::Geometry geometry{.layers = layers, .q_heads = 4, .kv_heads = 2, .head_dim = dim};
  const kvc::budget::PyramidKV planner({.window = 8});
  const Keyformer::Options options{.seed = 3};
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48), .auto_compress = false},
              Keyformer(options), {}, {}, {}, planner);
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const Tensor3 q = random_tensor(rng, 4, prompt, dim, 1.5F);
    Tensor3 out(4, prompt, dim);
    cache.append(seq, layer, random_tensor(rng, 2, prompt, dim).view(),
                 random_tensor(rng, 2, prompt, dim).view());
    const kvc::DenseLayer dense = cache.export_dense(seq, layer);
    Tensor3 stored(2, prompt, dim);
    for (std::size_t h = 0; h < 2; ++h) {
      std::copy(dense.keys[h].data(), dense.keys[h].data() + prompt * dim,
                stored.data.begin() + static_cast<std::ptrdiff_t>(h * prompt * dim));
    }
    cache.attend(seq, layer, q.view(), out.mutable_view());
    const std::size_t planned = planner.layer_budget(layer, layers, 48, prompt);
    cache.compress(seq, layer);
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(layer, h, planned);
      ReferenceKeyformer reference{
          options, planned, Keyformer(options).recent_for(planned), dim, 2, layer, h, {}, {},
          {},      0};
      reference.append(stored, 0);
      reference.attend(q, prompt);
      reference.compress();
      CHECK(cache.positions(seq, layer, h) == reference.positions);
      CHECK(cache.tokens(seq, layer, h) == planned);
    }
  }
}
