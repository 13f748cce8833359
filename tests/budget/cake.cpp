// Tests of kvc/budget/cake.hpp: the layer preference on hand-made observe events and the
// budgets against a float64 re-implementation of cakekv (calculate_entropy, torch.var,
// adjust_budgets), hand-checked allocations, the cascade through a KvCache with
// CakeIndicator (every earlier layer squeezed to its new share, the final split equal to the
// one-shot allocation, a decode step), and the compositions with H2O, SnapKV and Int8.
#include <kvc/budget/cake.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/cake_indicator.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/int8.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace {

using kvc::Position;
using kvc::budget::Cake;
using kvc::test::random_tensor;
using kvc::test::Tensor3;

static_assert(kvc::BudgetPlanner<Cake>);
static_assert(kvc::PlansLayersWithState<Cake>);
static_assert(kvc::ObservesLayers<Cake>);
static_assert(kvc::Cascades<Cake>);
static_assert(!kvc::PlansLayers<Cake>);
static_assert(!kvc::PlansSequence<Cake>);
static_assert(!kvc::PlansFromScores<Cake>);

// ---- float64 reference (cakekv) --------------------------------------------------------

// One kv head's observe event, owned: weights [group · window][tokens].
struct Event {
  std::size_t kv_head = 0, group = 1, window = 0, tokens = 0;
  std::vector<double> weights;
  kvc::ObserveEvent view(std::size_t layer, std::vector<float>& storage) const {
    storage.assign(weights.begin(), weights.end());
    return {layer, kv_head, storage, group * window, window, tokens};
  }
};

// modify_llama.py: A = the last w rows of every query head, prefix columns [:-w];
// H = −Σ A·log(A + 1e−10); V = Σ torch.var(A, dim=rows) (unbiased).
struct Measured {
  double entropy = 0, variance = 0;
};
Measured reference_measure(const std::vector<Event>& heads, std::size_t window) {
  Measured result;
  for (const Event& event : heads) {
    const std::size_t w = std::min(window, event.window);
    const std::size_t prefix = event.tokens > w ? event.tokens - w : 0;
    for (std::size_t a = 0; a < event.group; ++a) {
      for (std::size_t t = 0; t < prefix; ++t) {
        double mean = 0;
        for (std::size_t j = event.window - w; j < event.window; ++j) {
          const double x =
              static_cast<float>(event.weights[(a * event.window + j) * event.tokens + t]);
          result.entropy -= x * std::log(x + 1e-10);
          mean += x / double(w);
        }
        double squares = 0;
        for (std::size_t j = event.window - w; j < event.window; ++j) {
          const double x =
              static_cast<float>(event.weights[(a * event.window + j) * event.tokens + t]);
          squares += (x - mean) * (x - mean);
        }
        if (w > 1) result.variance += squares / double(w - 1);
      }
    }
  }
  return result;
}

double reference_preference(const Measured& m, double tau1, double tau2) {
  return std::pow(std::max(0.0, m.entropy), 1 / tau1) *
         std::pow(std::max(0.0, m.variance), 1 / tau2);
}

// cakekv utils.py adjust_budgets, literally (numpy int arrays, one pass per step).
std::vector<long> reference_adjust_budgets(std::vector<long> budgets, long total, long seq_len) {
  const std::size_t size = budgets.size();
  long total_excess = 0;
  for (long& b : budgets) {
    total_excess += std::max(b - seq_len, 0L);
    b = std::min(b, seq_len);
  }
  const auto spread = [&](long amount, bool add, auto valid_of) {
    std::vector<std::size_t> valid;
    for (std::size_t i = 0; i < size; ++i) {
      if (valid_of(budgets[i])) valid.push_back(i);
    }
    if (valid.empty()) return;
    const long per = amount / static_cast<long>(valid.size());
    const long remainder = amount % static_cast<long>(valid.size());
    for (std::size_t r = 0; r < valid.size(); ++r) {
      const long delta = per + (static_cast<long>(r) < remainder ? 1 : 0);
      budgets[valid[r]] += add ? delta : -delta;
    }
  };
  if (total_excess > 0) spread(total_excess, true, [&](long b) { return b < seq_len; });
  long current = 0;
  for (long b : budgets) current += b;
  const long diff = total - current;
  if (diff > 0) spread(diff, true, [&](long b) { return b < seq_len; });
  if (diff < 0) spread(-diff, false, [&](long b) { return b > 1; });
  return budgets;
}

// CakeprefillKVCache.__call__ over the observed layers' preferences: budgets window
// included (min(b, n − w) + w, the clamp the eviction applies). `reference_overflowed`
// tells whether a single-pass spread left a budget above n − w.
struct ReferenceSplit {
  std::vector<std::size_t> budgets;
  bool overflowed = false;
};
ReferenceSplit reference_split(const std::vector<double>& preferences, std::size_t layers,
                               std::size_t base, std::size_t n, std::size_t window) {
  const long total = static_cast<long>((base - window) * layers);
  const long cap = static_cast<long>(n - window);
  double sum = 0;
  for (double p : preferences) sum += p;
  std::vector<long> budgets;
  for (double p : preferences) {
    const double share =
        sum > 0 ? p / sum * double(total) : double(total) / double(preferences.size());
    budgets.push_back(static_cast<long>(share));
  }
  budgets = reference_adjust_budgets(budgets, total, cap);
  ReferenceSplit split;
  for (long b : budgets) {
    split.overflowed = split.overflowed || b > cap;
    split.budgets.push_back(static_cast<std::size_t>(std::min(b, cap) + long(window)));
  }
  return split;
}

// A softmax-like row: positive, sums to 1.
std::vector<double> random_rows(std::mt19937& rng, std::size_t rows, std::size_t tokens,
                                double sharpness) {
  std::normal_distribution<double> normal(0.0, sharpness);
  std::vector<double> weights(rows * tokens);
  for (std::size_t r = 0; r < rows; ++r) {
    double total = 0;
    for (std::size_t t = 0; t < tokens; ++t)
      total += weights[r * tokens + t] = std::exp(normal(rng));
    for (std::size_t t = 0; t < tokens; ++t) weights[r * tokens + t] /= total;
  }
  return weights;
}

// A state whose observed layers have P_l = preferences[l] (τ = 1: H = P, V = 1); a
// negative preference marks a layer never observed.
Cake::SequenceState state_of(const std::vector<double>& preferences) {
  Cake::SequenceState state;
  for (double p : preferences) {
    state.layers.push_back({.entropy = p, .variance = 1.0, .observed = p >= 0});
  }
  return state;
}

std::vector<std::size_t> budgets_of(Cake& planner, const Cake::SequenceState& state,
                                    std::size_t layers, std::size_t base, std::size_t n) {
  std::vector<std::size_t> budgets;
  for (std::size_t l = 0; l < layers; ++l) {
    budgets.push_back(planner.layer_budget(state, l, layers, base, n));
  }
  return budgets;
}

std::size_t sum(const std::vector<std::size_t>& values) {
  return std::accumulate(values.begin(), values.end(), std::size_t{0});
}

}  // namespace

TEST_CASE("Cake measures entropy and unbiased variance over the window rows and prefix", "[cake]") {
  // One kv head, one query head, window 2 over 4 tokens: prefix = columns 0, 1.
  // Rows (0.5, 0.3 | ...) and (0.1, 0.7 | ...): H = −Σ x·log(x + 1e−10) over the four prefix
  // values, V = var(0.5, 0.1) + var(0.3, 0.7) = 0.08 + 0.08.
  const std::vector<float> rows{0.5F, 0.3F, 0.1F, 0.1F, 0.1F, 0.7F, 0.1F, 0.1F};
  Cake planner({.window = 2});
  Cake::SequenceState state;
  planner.on_observe(state, kvc::ObserveEvent{1, 0, rows, 2, 2, 4});
  REQUIRE(state.layers.size() == 2);
  CHECK_FALSE(state.layers[0].observed);
  CHECK(state.layers[1].observed);
  double entropy = 0;
  for (float x : {0.5F, 0.3F, 0.1F, 0.7F}) entropy -= double(x) * std::log(double(x) + 1e-10);
  CHECK(state.layers[1].entropy == Approx(entropy).epsilon(1e-12));
  CHECK(state.layers[1].variance == Approx(0.16).epsilon(1e-6));
  CHECK(planner.preference(state, 1) == Approx(entropy * 0.16).epsilon(1e-6));
  CHECK(planner.preference(state, 0) == 0.0);
  CHECK(planner.preference(state, 7) == 0.0);

  SECTION("temperatures are the roots of H and V") {
    Cake tempered({.window = 2, .tau1 = 2.0, .tau2 = 0.5});
    CHECK(tempered.preference(state, 1) == Approx(std::sqrt(entropy) * 0.16 * 0.16).epsilon(1e-6));
  }
  SECTION("a second kv head adds, a new observe at kv head 0 replaces") {
    planner.on_observe(state, kvc::ObserveEvent{1, 1, rows, 2, 2, 4});
    CHECK(state.layers[1].entropy == Approx(2 * entropy).epsilon(1e-12));
    CHECK(state.layers[1].variance == Approx(0.32).epsilon(1e-6));
    planner.on_observe(state, kvc::ObserveEvent{1, 0, rows, 2, 2, 4});
    CHECK(state.layers[1].entropy == Approx(entropy).epsilon(1e-12));
  }
  SECTION("window rows beyond the planner's window are ignored; one row has no variance") {
    Cake narrow({.window = 1});
    Cake::SequenceState one;
    narrow.on_observe(one, kvc::ObserveEvent{0, 0, rows, 2, 2, 4});
    // The last row only, prefix 3 columns: (0.1, 0.7, 0.1).
    double expected = 0;
    for (float x : {0.1F, 0.7F, 0.1F}) expected -= double(x) * std::log(double(x) + 1e-10);
    CHECK(one.layers[0].entropy == Approx(expected).epsilon(1e-12));
    CHECK(one.layers[0].variance == 0.0);
    CHECK(narrow.preference(one, 0) == 0.0);
  }
  SECTION("options are checked") {
    CHECK_THROWS_AS(Cake({.window = 0}), kvc::BudgetError);
    CHECK_THROWS_AS(Cake({.tau1 = 0.0}), kvc::BudgetError);
    CHECK_THROWS_AS(Cake({.tau2 = -1.0}), kvc::BudgetError);
    CHECK_THROWS_AS(Cake({.tau1 = std::nan("")}), kvc::BudgetError);
  }
}

TEST_CASE("Cake preferences match a float64 re-implementation on random events", "[cake]") {
  std::mt19937 rng(31);
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t kv_heads = 1 + trial % 3, group = 1 + (trial / 3) % 3;
    const std::size_t event_window = 1 + trial % 7, tokens = event_window + trial % 40;
    const std::size_t window = 1 + (trial * 7) % 9;
    const double tau1 = trial % 2 == 0 ? 1.0 : 1.6, tau2 = trial % 3 == 0 ? 1.0 : 0.4;
    CAPTURE(trial, kv_heads, group, event_window, tokens, window);
    std::vector<Event> events;
    for (std::size_t h = 0; h < kv_heads; ++h) {
      events.push_back({h, group, event_window, tokens,
                        random_rows(rng, group * event_window, tokens, 0.5 + double(h))});
    }
    Cake planner({.window = window, .tau1 = tau1, .tau2 = tau2});
    Cake::SequenceState state;
    std::vector<float> storage;
    for (const Event& event : events) planner.on_observe(state, event.view(0, storage));
    const Measured expected = reference_measure(events, window);
    CHECK(state.layers[0].entropy == Approx(expected.entropy).epsilon(1e-12).margin(1e-300));
    CHECK(state.layers[0].variance == Approx(expected.variance).epsilon(1e-9).margin(1e-300));
    CHECK(planner.preference(state, 0) ==
          Approx(reference_preference(expected, tau1, tau2)).epsilon(1e-9).margin(1e-300));
  }
}

TEST_CASE("Cake splits the model budget by preference on hand-checked layers", "[cake]") {
  Cake planner({.window = 4});
  // L = 3, B = 20, w = 4: total = (20 − 4)·3 = 48 prefix tokens.
  SECTION("exact shares 8, 16, 24 plus the window") {
    CHECK(budgets_of(planner, state_of({1, 2, 3}), 3, 20, 100) ==
          std::vector<std::size_t>{12, 20, 28});
  }
  SECTION("truncation: 6.86, 13.71, 27.43 → 6, 13, 27, the 2 left to the lowest layers") {
    const auto budgets = budgets_of(planner, state_of({1, 2, 4}), 3, 20, 100);
    CHECK(budgets == std::vector<std::size_t>{11, 18, 31});
    CHECK(sum(budgets) == 3 * 20);
  }
  SECTION("cap: 4, 4, 40 with n − w = 30 → the 10 over the cap split 5 and 5") {
    // Layer 2 keeps every one of its n = 34 tokens.
    CHECK(budgets_of(planner, state_of({1, 1, 10}), 3, 20, 34) ==
          std::vector<std::size_t>{13, 13, 34});
  }
  SECTION("cascade: layers 0 and 1 share the whole model total, and shrink when 2 arrives") {
    // Seen {0, 1}: 48·1/3 = 16, 48·2/3 = 32; layer 2 not observed: the uniform B.
    CHECK(budgets_of(planner, state_of({1, 2, -1}), 3, 20, 100) ==
          std::vector<std::size_t>{20, 36, 20});
    // Seen {0}: all 48 — capped at n − w = 40 (nothing to spread to).
    CHECK(budgets_of(planner, state_of({1, -1, -1}), 3, 20, 44) ==
          std::vector<std::size_t>{44, 20, 20});
  }
  SECTION("skip while n ≤ B, uniform B when the budget cannot hold the window") {
    CHECK(budgets_of(planner, state_of({1, 2, 4}), 3, 20, 20) ==
          std::vector<std::size_t>{20, 20, 20});
    CHECK(budgets_of(planner, state_of({1, 2, 4}), 3, 20, 15) ==
          std::vector<std::size_t>{15, 15, 15});
    CHECK(budgets_of(planner, state_of({1, 2, 4}), 3, 4, 100) == std::vector<std::size_t>{4, 4, 4});
    const std::size_t unlimited = kvc::Budget::unlimited().resolve(100);
    CHECK(budgets_of(planner, state_of({1, 2, 4}), 3, unlimited, 100) ==
          std::vector<std::size_t>{100, 100, 100});
  }
  SECTION("every observed layer without preference: an even split") {
    CHECK(budgets_of(planner, state_of({0, 0, 0}), 3, 20, 100) ==
          std::vector<std::size_t>{20, 20, 20});
  }
  SECTION("plan_layer gives every kv head the layer's budget") {
    std::vector<std::size_t> heads(3, 0);
    const std::vector<std::size_t> stored{100, 7, 0};
    planner.plan_layer(
        kvc::LayerPlan{
            {.layers = 3, .q_heads = 6, .kv_heads = 3, .head_dim = 8}, 2, 20, 100, stored},
        state_of({1, 2, 4}), heads);
    CHECK(heads == std::vector<std::size_t>(3, 31));
  }
}

TEST_CASE("Cake adjust_budgets repeats a spread that overflows the cap", "[cake]") {
  // Cap 10, total 40: the reference spreads the excess 20 once over {1, 2, 3} (+7, +7, +6),
  // which pushes layer 1 to 16, and the eviction's clamp loses those 6 tokens.
  std::vector<std::size_t> budgets{30, 9, 1, 0};
  Cake::adjust_budgets(budgets, 40, 10);
  CHECK(budgets == std::vector<std::size_t>{10, 10, 10, 10});
  CHECK(reference_adjust_budgets({30, 9, 1, 0}, 40, 10) == std::vector<long>{10, 16, 8, 6});
  // Without overflow both agree: truncated 6, 13, 27 → +1, +1, 0.
  budgets = {6, 13, 27};
  Cake::adjust_budgets(budgets, 48, 96);
  CHECK(budgets == std::vector<std::size_t>{7, 14, 27});
  // More total than the layers can hold: every layer capped.
  budgets = {50, 50};
  Cake::adjust_budgets(budgets, 100, 30);
  CHECK(budgets == std::vector<std::size_t>{30, 30});
}

TEST_CASE("Cake budgets match the cakekv allocation on random preferences", "[cake]") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::size_t compared = 0, overflowed = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const std::size_t layers = 1 + rng() % 12;
    const std::size_t window = 1 + rng() % 16;
    const std::size_t base = window + 1 + rng() % 100;
    const std::size_t n = base + 1 + rng() % (trial % 4 == 0 ? 20 : 400);
    std::vector<double> preferences(layers);
    for (double& p : preferences) {
      const double x = unit(rng);
      p = x < 0.1 ? -1.0 : x < 0.15 ? 0.0 : std::exp(6.0 * unit(rng));  // unobserved, zero
    }
    CAPTURE(trial, layers, window, base, n);
    Cake planner({.window = window});
    const auto state = state_of(preferences);
    const auto budgets = budgets_of(planner, state, layers, base, n);
    std::vector<double> seen;
    for (double p : preferences) {
      if (p >= 0) seen.push_back(p);
    }
    if (seen.empty()) {
      CHECK(budgets == std::vector<std::size_t>(layers, base));
      continue;
    }
    const ReferenceSplit reference = reference_split(seen, layers, base, n, window);
    std::vector<std::size_t> observed_budgets;
    for (std::size_t l = 0; l < layers; ++l) {
      if (preferences[l] < 0) {
        CHECK(budgets[l] == base);
      } else {
        CHECK(budgets[l] >= window);
        CHECK(budgets[l] <= n);
        observed_budgets.push_back(budgets[l]);
      }
    }
    // Σ over the observed layers = min(total, |S|·(n − w)) + |S|·w.
    const std::size_t total = (base - window) * layers;
    CHECK(sum(observed_budgets) ==
          std::min(total, seen.size() * (n - window)) + seen.size() * window);
    if (!reference.overflowed) {
      CHECK(observed_budgets == reference.budgets);
      ++compared;
    } else {
      ++overflowed;
    }
  }
  CHECK(compared > 2000);
  CHECK(overflowed > 0);  // the repeated spread was exercised
}

namespace {

using CakeCache = kvc::KvCache<kvc::evict::CakeIndicator, kvc::quant::Dense<float>,
                               kvc::retrieval::Exhaustive, kvc::offload::None, Cake>;

// Window softmax of the last `window` queries of query head a (float64), as observe() hands
// it over: rows over all n keys of kv head h, causal inside the window.
std::vector<double> window_softmax(const Tensor3& k, std::size_t kv_head, const Tensor3& q,
                                   std::size_t window) {
  const std::size_t n = k.tokens, dim = k.dim, group = q.heads / k.heads;
  std::vector<Position> positions(n);
  std::iota(positions.begin(), positions.end(), 0);
  std::vector<double> rows;
  for (std::size_t a = 0; a < group; ++a) {
    for (std::size_t j = q.tokens - window; j < q.tokens; ++j) {
      std::vector<float> query(dim);
      for (std::size_t c = 0; c < dim; ++c) query[c] = q.at(kv_head * group + a, j, c);
      const auto weights =
          kvc::test::reference_weights(query, k.data.data() + kv_head * n * dim, positions,
                                       static_cast<Position>(n - q.tokens + j), dim);
      rows.insert(rows.end(), weights.begin(), weights.end());
    }
  }
  return rows;
}

}  // namespace

TEST_CASE("Cake cascades through a KvCache: each new layer squeezes the earlier ones", "[cake]") {
  constexpr std::size_t layers = 5, kv_heads = 2, q_heads = 4, dim = 16, n = 120, window = 8;
  constexpr std::size_t budget = 24;
  const kvc::Geometry geometry{
      .layers = layers, .q_heads = q_heads, .kv_heads = kv_heads, .head_dim = dim};
  CakeCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                  kvc::evict::CakeIndicator({.window = window}), {}, {}, {},
                  Cake({.window = window}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(17);
  std::vector<double> reference_preferences;
  std::vector<std::size_t> held(layers, 0);
  std::size_t squeezed = 0, exact_shares = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    // Sharper attention in some layers than in others.
    const float sharpness = std::vector<float>{0.3F, 2.0F, 0.8F, 3.0F, 1.2F}[layer];
    const Tensor3 k = random_tensor(rng, kv_heads, n, dim, sharpness);
    const Tensor3 v = random_tensor(rng, kv_heads, n, dim);
    const Tensor3 q = random_tensor(rng, q_heads, n, dim);
    Tensor3 out(q_heads, n, dim);
    const std::size_t bytes_before = cache.stats().code_bytes;
    cache.append(seq, layer, k.view(), v.view());
    cache.observe(seq, layer, q.slice(n - window, window));
    cache.attend(seq, layer, q.view(), out.mutable_view());

    // The preference the cache measured, against float64 attention.
    std::vector<Event> events;
    for (std::size_t h = 0; h < kv_heads; ++h) {
      events.push_back({h, q_heads / kv_heads, window, n, window_softmax(k, h, q, window)});
    }
    const Measured measured = reference_measure(events, window);
    reference_preferences.push_back(reference_preference(measured, 1, 1));
    const auto& state = cache.planner_state(seq);
    CHECK(cache.planner().preference(state, layer) ==
          Approx(reference_preferences.back()).epsilon(1e-4));

    // Every layer seen so far holds its new share (or what it kept when its share was
    // smaller: shares only shrink, but a truncation remainder can move by one).
    const auto shares = budgets_of(cache.planner(), state, layers, budget, n);
    const ReferenceSplit reference =
        reference_split(reference_preferences, layers, budget, n, window);
    std::size_t total_held = 0;
    for (std::size_t l = 0; l <= layer; ++l) {
      CAPTURE(layer, l);
      const std::size_t expected = l == layer ? shares[l] : std::min(shares[l], held[l]);
      CHECK(shares[l] == reference.budgets[l]);  // float64 preferences split the same way
      for (std::size_t h = 0; h < kv_heads; ++h) CHECK(cache.tokens(seq, l, h) == expected);
      if (l < layer && expected < held[l]) ++squeezed;
      if (cache.tokens(seq, l, 0) == shares[l]) ++exact_shares;
      held[l] = cache.tokens(seq, l, 0);
      total_held += held[l];
    }
    for (std::size_t l = layer + 1; l < layers; ++l) CHECK(cache.tokens(seq, l, 0) == 0);
    CHECK(total_held <= layers * budget);
    const kvc::CacheStats stats = cache.stats();
    CHECK(stats.code_bytes == stats.tokens_stored * cache.bytes_per_token());
    // The new layer added at most n tokens per head, and the cascade took some back.
    if (layer > 0) CHECK(stats.code_bytes < bytes_before + n * kv_heads * cache.bytes_per_token());
  }
  CHECK(squeezed >= layers - 1);  // every new layer squeezed some earlier one
  CHECK(exact_shares == layers * (layers + 1) / 2);

  // After the last layer: the one-shot split of the whole model, Σ = L·B.
  CHECK(sum(held) == layers * budget);
  std::vector<std::size_t> distinct(held);
  std::sort(distinct.begin(), distinct.end());
  CHECK(std::unique(distinct.begin(), distinct.end()) - distinct.begin() > 2);  // uneven
  const auto final_shares =
      budgets_of(cache.planner(), cache.planner_state(seq), layers, budget, n);
  CHECK(held == final_shares);

  // A decode step: every layer evicts back to its (unchanged) budget.
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const Tensor3 k = random_tensor(rng, kv_heads, 1, dim);
    const Tensor3 q = random_tensor(rng, q_heads, 1, dim);
    Tensor3 out(q_heads, 1, dim);
    cache.append(seq, layer, k.view(), random_tensor(rng, kv_heads, 1, dim).view());
    cache.attend(seq, layer, q.view(), out.mutable_view());
    CHECK(std::all_of(out.data.begin(), out.data.end(), [](float x) { return std::isfinite(x); }));
    for (std::size_t h = 0; h < kv_heads; ++h) {
      CHECK(cache.tokens(seq, layer, h) == final_shares[layer]);
      CHECK(cache.positions(seq, layer, h).back() == static_cast<Position>(n));  // new token kept
    }
  }
  CHECK(budgets_of(cache.planner(), cache.planner_state(seq), layers, budget, n + 1) ==
        final_shares);
  CHECK(cache.stats().tokens_stored == layers * kv_heads * budget);
}

TEST_CASE("Cake: a layer whose share is every token, and compress(seq) after the prefill",
          "[cake]") {
  // B = 40 of n = 60 with L = 3: the model total (40 − 8)·3 = 96 exceeds n − w = 52, so a
  // layer of high preference is capped and keeps all it holds. When the *last* layer is
  // capped it is not compressed at its attend, but the cascade still runs there and
  // squeezes the earlier layers; compress(seq) afterwards changes nothing.
  constexpr std::size_t layers = 3, kv_heads = 2, q_heads = 4, dim = 16, n = 60, window = 8;
  constexpr std::size_t budget = 40;
  CakeCache cache({.layers = layers, .q_heads = q_heads, .kv_heads = kv_heads, .head_dim = dim},
                  {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                  kvc::evict::CakeIndicator({.window = window}), {}, {}, {},
                  Cake({.window = window}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(17);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const float sharpness = std::vector<float>{0.3F, 1.0F, 3.0F}[layer];
    const Tensor3 k = random_tensor(rng, kv_heads, n, dim, sharpness);
    const Tensor3 v = random_tensor(rng, kv_heads, n, dim);
    const Tensor3 q = random_tensor(rng, q_heads, n, dim);
    Tensor3 out(q_heads, n, dim);
    cache.append(seq, layer, k.view(), v.view());
    cache.observe(seq, layer, q.slice(n - window, window));
    cache.attend(seq, layer, q.view(), out.mutable_view());
  }
  const auto shares = budgets_of(cache.planner(), cache.planner_state(seq), layers, budget, n);
  REQUIRE(shares[layers - 1] == n);  // the last layer is capped: it keeps everything
  CHECK(sum(shares) == layers * budget);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < kv_heads; ++h) CHECK(cache.tokens(seq, layer, h) == shares[layer]);
  }
  cache.compress(seq);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < kv_heads; ++h) CHECK(cache.tokens(seq, layer, h) == shares[layer]);
  }
  CHECK(cache.stats().tokens_stored == layers * kv_heads * budget);
}

namespace {

// Prefill a model layer by layer (append, observe the window, attend with auto_compress),
// then check every head holds its layer's budget and the layers sum to L·B.
template <class Scorer, class Quant>
void cake_smoke(Scorer scorer) {
  using Cache = kvc::KvCache<Scorer, Quant, kvc::retrieval::Exhaustive, kvc::offload::None, Cake>;
  constexpr std::size_t layers = 4, kv_heads = 2, q_heads = 4, dim = 32, n = 100, window = 8;
  constexpr std::size_t budget = 30;
  Cache cache({.layers = layers, .q_heads = q_heads, .kv_heads = kv_heads, .head_dim = dim},
              {.budget = kvc::Budget::tokens(budget)}, std::move(scorer), {}, {}, {},
              Cake({.window = window}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(23);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const Tensor3 k = random_tensor(rng, kv_heads, n, dim, 0.5F + float(layer));
    const Tensor3 q = random_tensor(rng, q_heads, n, dim);
    Tensor3 out(q_heads, n, dim);
    cache.append(seq, layer, k.view(), random_tensor(rng, kv_heads, n, dim).view());
    cache.observe(seq, layer, q.slice(n - window, window));
    cache.attend(seq, layer, q.view(), out.mutable_view());
    CHECK(std::all_of(out.data.begin(), out.data.end(), [](float x) { return std::isfinite(x); }));
  }
  const auto& state = cache.planner_state(seq);
  std::size_t total = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const std::size_t expected = cache.planner().layer_budget(state, layer, layers, budget, n);
    for (std::size_t h = 0; h < kv_heads; ++h) CHECK(cache.tokens(seq, layer, h) == expected);
    total += expected;
  }
  CHECK(total == layers * budget);
  const kvc::CacheStats stats = cache.stats();
  CHECK(stats.tokens_stored == layers * kv_heads * budget);
  CHECK(stats.code_bytes == stats.tokens_stored * cache.bytes_per_token());
}

}  // namespace

TEST_CASE("Cake composes with H2O, SnapKV and the Int8 quantizer", "[cake]") {
  SECTION("H2O, Dense<float>") {
    cake_smoke<kvc::evict::H2O, kvc::quant::Dense<float>>(kvc::evict::H2O({.recent_tokens = 8}));
  }
  SECTION("H2O, Int8") {
    cake_smoke<kvc::evict::H2O, kvc::quant::Int8<>>(kvc::evict::H2O({.recent_tokens = 8}));
  }
  SECTION("SnapKV, Dense<float>") {
    cake_smoke<kvc::evict::SnapKV, kvc::quant::Dense<float>>(kvc::evict::SnapKV({.window = 8}));
  }
  SECTION("SnapKV, Int8") {
    cake_smoke<kvc::evict::SnapKV, kvc::quant::Int8<>>(kvc::evict::SnapKV({.window = 8}));
  }
  SECTION("CakeIndicator, Int8") {
    cake_smoke<kvc::evict::CakeIndicator, kvc::quant::Int8<>>(
        kvc::evict::CakeIndicator({.window = 8}));
  }
}
