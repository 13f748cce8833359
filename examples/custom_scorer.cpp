// custom-scorer — writing your own eviction policy for kvc::KvCache.
//
// A policy is a small struct that satisfies a concept; there is no base class to derive
// from. This one, WindowVote, lets the last window of prompt queries vote: each window
// query (of every query head in the GQA group) gives one vote to each of the `votes` tokens
// it attends most, and a head keeps its most-voted tokens plus the `recent` newest ones.
// It is a cousin of SnapKV that counts votes instead of summing attention mass.
//
// The program plants four "needle" tokens whose keys match what the window queries ask
// for, compresses a 512-token prompt to 48 tokens per head with WindowVote and with
// StreamingLLM, and prints which positions each kept.
#include <kvc/kvc.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string_view>
#include <vector>

// ---------------------------------------------------------------------------------------
// The policy: every member below is one named requirement of kvc::EvictionScorer
// (docs/concepts.md lists them).
struct WindowVote {
  struct Options {
    std::size_t votes = 4;    // tokens each window query votes for
    std::size_t recent = 16;  // newest tokens always kept
  };
  // Per (sequence, layer, kv head) state: the cache stores it, copies it on fork and
  // asks us to compact it after an eviction.
  struct HeadState {
    std::vector<float> votes;  // per stored token, in storage order
  };

  static constexpr bool evicts = true;                                         // DeclaresEviction
  static constexpr std::string_view name() noexcept { return "window_vote"; }  // NamedPolicy

  Options options{};

  // TracksAppends: new tokens start with no votes.
  void on_append(HeadState& state, const kvc::AppendEvent& event) const {
    state.votes.resize(state.votes.size() + event.count, 0.0F);
  }

  // ObservesQueries (optional): the window's softmax rows over all stored tokens. Only the
  // latest window counts, so the votes are recounted from scratch.
  void on_observe(HeadState& state, const kvc::ObserveEvent& event) const {
    std::fill(state.votes.begin(), state.votes.end(), 0.0F);
    std::vector<std::uint32_t> order(event.tokens);
    const std::size_t top = std::min(options.votes, event.tokens);
    for (std::size_t r = 0; r < event.query_rows; ++r) {
      const float* row = event.weights.data() + r * event.tokens;
      std::iota(order.begin(), order.end(), 0U);
      std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top),
                        order.end(),
                        [&](std::uint32_t a, std::uint32_t b) { return row[a] > row[b]; });
      for (std::size_t i = 0; i < top; ++i) state.votes[order[i]] += 1.0F;
    }
  }

  // ScoresTokens: the cache keeps the `context.budget` highest scores (ties: newer token);
  // +inf pins a token. context.positions gives each stored token's position.
  void score(const HeadState& state, const kvc::ScoreContext& context,
             std::span<float> scores) const noexcept {
    const auto newest = static_cast<kvc::Position>(context.tokens_seen) - 1;
    for (std::size_t i = 0; i < scores.size(); ++i) {
      const bool recent =
          newest - context.positions[i] < static_cast<kvc::Position>(options.recent);
      scores[i] = recent ? std::numeric_limits<float>::infinity() : state.votes[i];
    }
  }

  // CompactsState: `kept` lists the surviving slots, ascending; keep our state aligned.
  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t i = 0; i < kept.size(); ++i) state.votes[i] = state.votes[kept[i]];
    state.votes.resize(kept.size());
  }

  // ReportsStateBytes (optional): counted in stats().metadata_bytes.
  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.votes.capacity() * sizeof(float);
  }
};

static_assert(kvc::EvictionScorer<WindowVote>);
static_assert(kvc::ObservesQueries<WindowVote>);

// ---------------------------------------------------------------------------------------
// A scorer that forgot on_compact is not an EvictionScorer, and the diagnostic names the
// concept of the missing piece. `kvc::KvCache<Forgetful> cache(geometry);` gives (g++ 12):
//
//   error: template constraint failure for '... class kvc::KvCache'
//   note: constraints not satisfied
//   concepts.hpp:66:9:   required for the satisfaction of 'CompactsState<S>' [with S = Forgetful]
//   concepts.hpp:86:9:   required for the satisfaction of 'EvictionScorer<Scorer>' [...]
//   concepts.hpp:68:20: note: the required expression 'scorer.on_compact(state, kept)' is invalid
struct Forgetful {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "forgetful"; }
  void on_append(HeadState&, const kvc::AppendEvent&) const noexcept {}
  void score(const HeadState&, const kvc::ScoreContext&, std::span<float>) const noexcept {}
};
static_assert(!kvc::EvictionScorer<Forgetful>);
static_assert(!kvc::CompactsState<Forgetful>);  // the piece that is missing
static_assert(kvc::ScoresTokens<Forgetful>);    // the rest is fine

// ---------------------------------------------------------------------------------------

namespace {

constexpr kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 32};
constexpr std::size_t prompt = 512;
constexpr std::size_t window = 16;
constexpr std::size_t budget = 48;
constexpr std::size_t needles[] = {100, 101, 250, 400};

// A [heads][tokens][head_dim] tensor owned by the example.
struct Tensor {
  std::size_t heads, tokens;
  std::vector<float> data;
  Tensor(std::size_t h, std::size_t t) : heads(h), tokens(t), data(h * t * geometry.head_dim) {}
  float* at(std::size_t h, std::size_t t) {
    return data.data() + (h * tokens + t) * geometry.head_dim;
  }
  kvc::View<const float, 3> view() const {
    return {data.data(), {heads, tokens, geometry.head_dim}};
  }
  kvc::View<float, 3> mutable_view() { return {data.data(), {heads, tokens, geometry.head_dim}}; }
};

Tensor random_tensor(std::mt19937& rng, std::size_t heads, std::size_t tokens) {
  Tensor t(heads, tokens);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  for (float& x : t.data) x = normal(rng);
  return t;
}

struct Inputs {
  Tensor k, v, q_window;
};

// Random K/V; the needles' keys point along one direction per kv head, and the window
// queries of that head's group point the same way (plus noise).
Inputs make_inputs() {
  std::mt19937 rng(7);
  Inputs in{random_tensor(rng, geometry.kv_heads, prompt),
            random_tensor(rng, geometry.kv_heads, prompt),
            random_tensor(rng, geometry.q_heads, window)};
  const Tensor direction = random_tensor(rng, geometry.kv_heads, 1);
  for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
    const float* u = direction.data.data() + h * geometry.head_dim;
    for (std::size_t position : needles) {
      std::copy(u, u + geometry.head_dim, in.k.at(h, position));
    }
    for (std::size_t g = 0; g < geometry.group_size(); ++g) {
      for (std::size_t t = 0; t < window; ++t) {
        float* q = in.q_window.at(h * geometry.group_size() + g, t);
        for (std::size_t c = 0; c < geometry.head_dim; ++c) q[c] = 2.0F * u[c] + 0.5F * q[c];
      }
    }
  }
  return in;
}

std::size_t needles_kept(const std::vector<kvc::Position>& kept) {
  std::size_t found = 0;
  for (std::size_t n : needles) {
    found += static_cast<std::size_t>(
        std::count(kept.begin(), kept.end(), static_cast<kvc::Position>(n)));
  }
  return found;
}

template <class Cache>
void report(std::string_view label, const Cache& cache, kvc::SequenceId seq) {
  for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
    const std::vector<kvc::Position> kept = cache.positions(seq, 0, h);
    const std::vector<kvc::Position> oldest(kept.begin(), kept.begin() + 10);
    fmt::print("  {:<13} kv head {}: {} of {} kept, needles {}/{}, oldest: {} ...\n", label, h,
               kept.size(), cache.tokens_seen(seq, 0), needles_kept(kept), std::size(needles),
               oldest);
  }
}

// Prefill the prompt, let the window vote, compress; then decode a few tokens.
template <class Cache>
void run(std::string_view label, Cache& cache, const Inputs& in) {
  const kvc::SequenceId seq = cache.open_sequence();
  cache.append(seq, 0, in.k.view(), in.v.view());
  // The window queries are those of the last `window` prompt positions.
  cache.observe(seq, 0, in.q_window.view());
  cache.compress(seq);
  report(label, cache, seq);

  // Decode: append one token, attend, and the cache evicts back to budget (auto_compress).
  std::mt19937 rng(11);
  for (int step = 0; step < 8; ++step) {
    const Tensor k = random_tensor(rng, geometry.kv_heads, 1);
    const Tensor v = random_tensor(rng, geometry.kv_heads, 1);
    const Tensor q = random_tensor(rng, geometry.q_heads, 1);
    Tensor out(geometry.q_heads, 1);
    cache.append(seq, 0, k.view(), v.view());
    cache.attend(seq, 0, q.view(), out.mutable_view());
  }
  report(label, cache, seq);
  cache.close(seq);
}

}  // namespace

int main() {
  const Inputs in = make_inputs();
  const kvc::CacheOptions options{.budget = kvc::Budget::tokens(budget)};
  fmt::print("{}-token prompt, budget {} tokens per head, needles at positions {}\n\n", prompt,
             budget, needles);

  kvc::KvCache<WindowVote> voted(geometry, options, WindowVote{{.votes = 4, .recent = 16}});
  run("window_vote", voted, in);
  fmt::print("\n");

  kvc::KvCache<kvc::evict::StreamingLLM> streaming(geometry, options);
  run("streaming_llm", streaming, in);
  return 0;
}
