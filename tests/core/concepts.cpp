// Tests of kvc/core/concepts.hpp: an archetype per role satisfies its concept, each
// shipped default does, and a type missing one member fails exactly the named piece.
#include <kvc/kvc.hpp>

#include <catch2/catch.hpp>

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

namespace archetype {

// The minimum each role asks for, nothing more.
struct Scorer {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() { return "archetype"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void score(const HeadState&, const kvc::ScoreContext&, std::span<float>) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
};

struct Planner {
  static constexpr std::string_view name() { return "archetype"; }
  void plan_layer(const kvc::LayerPlan&, std::span<std::size_t>) {}
};

struct Quantizer {
  static constexpr std::string_view name() { return "archetype"; }
  std::size_t key_bytes(std::size_t) const { return 1; }
  std::size_t value_bytes(std::size_t) const { return 1; }
  bool supports_head_dim(std::size_t) const { return true; }
  template <class T>
  void encode_key(const T*, std::size_t, std::byte*) const {}
  template <class T>
  void encode_value(const T*, std::size_t, std::byte*) const {}
  void decode_key(const std::byte*, std::size_t, float*) const {}
  void decode_value(const std::byte*, std::size_t, float*) const {}
  void score_tile(const kvc::ScoreTile&) const {}
  void accumulate_tile(const kvc::AccumulateTile&) const {}
};

struct SelectiveIndex {
  struct HeadState {};
  static constexpr bool reads_all = false;
  static constexpr std::string_view name() { return "archetype"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
  void select_pages(const HeadState&, const kvc::SelectContext&, std::vector<std::uint32_t>&) {}
};

struct Offload {
  static constexpr bool enabled = true;
  static constexpr std::string_view name() { return "archetype"; }
  bool put(const kvc::PageKey&, std::span<const std::byte>) { return true; }
  bool get(const kvc::PageKey&, std::span<std::byte>) { return true; }
  void erase(const kvc::PageKey&) {}
};

struct Backend {
  static constexpr bool host_accessible = true;
  static constexpr std::string_view name() { return "archetype"; }
  std::byte* allocate(std::size_t) { return nullptr; }
  void deallocate(std::byte*, std::size_t) {}
};

// One member missing each.
struct ScorerWithoutScore {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() { return "broken"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
};
struct QuantizerWithoutHalfInput : Quantizer {
  using Quantizer::encode_key;
  void encode_key(const Eigen::half*, std::size_t, std::byte*) const = delete;
};
struct IndexWithoutSelect {
  struct HeadState {};
  static constexpr bool reads_all = false;
  static constexpr std::string_view name() { return "broken"; }
};
struct Unnamed {
  void plan_layer(const kvc::LayerPlan&, std::span<std::size_t>) {}
};

// The optional hooks, each on top of a minimal role.
struct LayerStatePlanner {  // per-sequence state fed by observe(), cascading
  struct SequenceState {
    std::vector<std::size_t> observed_rows;  // per layer: window rows seen by on_observe
  };
  static constexpr bool cascades = true;
  static constexpr std::string_view name() { return "archetype_state"; }
  void on_observe(SequenceState& state, const kvc::ObserveEvent& event) {
    state.observed_rows.resize(std::max(state.observed_rows.size(), event.layer + 1));
    state.observed_rows[event.layer] += event.query_rows;
  }
  // Layers observed so far share 2 × base_budget... per head: each observed layer keeps
  // 2·B / (number of layers observed), unobserved layers keep everything.
  void plan_layer(const kvc::LayerPlan& plan, const SequenceState& state,
                  std::span<std::size_t> out) const {
    std::size_t seen = 0;
    for (std::size_t rows : state.observed_rows) seen += rows > 0 ? 1 : 0;
    const bool observed =
        plan.layer < state.observed_rows.size() && state.observed_rows[plan.layer] > 0;
    for (std::size_t h = 0; h < out.size(); ++h) {
      out[h] = observed ? 2 * plan.base_budget / seen : plan.stored[h];
    }
  }
};
struct SequencePlanner {  // plans all layers at once, when the last layer is compressed
  struct SequenceState {
    std::size_t plans = 0;
    std::vector<std::size_t> budgets;  // per layer
  };
  static constexpr std::string_view name() { return "archetype_sequence"; }
  bool wants_sequence_plan(const SequenceState&, const kvc::LayerPlan& plan) const {
    return plan.layer + 1 == plan.geometry.layers;
  }
  void plan_sequence(SequenceState& state, const kvc::SequencePlan& plan) {
    ++state.plans;
    state.budgets.clear();
    // Layer l keeps (l + 1) tokens per head; every head of every layer arrives scored.
    for (const kvc::LayerPlan& layer : plan.layers) {
      REQUIRE(layer.scores.size() == plan.geometry.kv_heads);
      for (std::size_t h = 0; h < layer.scores.size(); ++h) {
        REQUIRE(layer.scores[h].size() == layer.stored[h]);
      }
      state.budgets.push_back(layer.layer + 1);
    }
  }
  void plan_layer(const kvc::LayerPlan& plan, const SequenceState& state,
                  std::span<std::size_t> out) const {
    // Before the first plan the last layer asks for the base budget, so that the cache's
    // over-budget check fires there and triggers the sequence plan; the others wait.
    for (std::size_t h = 0; h < out.size(); ++h) {
      if (plan.layer < state.budgets.size()) {
        out[h] = state.budgets[plan.layer];
      } else {
        out[h] = plan.layer == 1 ? plan.base_budget : plan.stored[h];
      }
    }
  }
};
struct MergingScorer : Scorer {  // keeps the newest tokens, adds each evicted value into
                                 // the oldest survivor
  static constexpr std::string_view name() { return "archetype_merge"; }
  void score(const HeadState&, const kvc::ScoreContext& context, std::span<float> scores) {
    for (std::size_t i = 0; i < scores.size(); ++i) {
      scores[i] = static_cast<float>(context.positions[i]);
    }
  }
  void merge(HeadState&, const kvc::MergeEvent& event) {
    const std::size_t target = event.kept.front();
    std::size_t next_kept = 0;
    for (std::size_t slot = 0; slot < event.positions.size(); ++slot) {
      if (next_kept < event.kept.size() && event.kept[next_kept] == slot) {
        ++next_kept;
        continue;
      }
      for (std::size_t c = 0; c < event.head_dim; ++c) {
        event.values[target * event.head_dim + c] += event.values[slot * event.head_dim + c];
      }
      event.changed[target] = 1;
    }
  }
};
// Stores channel 0 negated; the query hook negates it back for scores, the output hook
// for values: attention must equal Dense<float>'s.
struct SignFlipQuantizer : kvc::quant::Dense<float> {
  static constexpr std::string_view name() { return "archetype_flip"; }
  template <class T>
  void encode_key(const T* source, std::size_t d, std::byte* codes) const {
    flipped(source, d, codes);
  }
  template <class T>
  void encode_value(const T* source, std::size_t d, std::byte* codes) const {
    flipped(source, d, codes);
  }
  void decode_key(const std::byte* codes, std::size_t d, float* out) const {
    Dense::decode_key(codes, d, out);
    out[0] = -out[0];
  }
  void decode_value(const std::byte* codes, std::size_t d, float* out) const {
    Dense::decode_value(codes, d, out);
    out[0] = -out[0];
  }
  void prepare_queries(float* queries, std::size_t rows, std::size_t d) const {
    for (std::size_t r = 0; r < rows; ++r) queries[r * d] = -queries[r * d];
  }
  void finish_outputs(float* outputs, std::size_t rows, std::size_t d) const {
    for (std::size_t r = 0; r < rows; ++r) outputs[r * d] = -outputs[r * d];
  }

 private:
  template <class T>
  static void flipped(const T* source, std::size_t d, std::byte* codes) {
    auto* out = reinterpret_cast<float*>(codes);
    for (std::size_t c = 0; c < d; ++c) out[c] = static_cast<float>(source[c]);
    out[0] = -out[0];
  }
};

}  // namespace archetype

static_assert(kvc::BudgetPlanner<archetype::LayerStatePlanner> &&
              kvc::ObservesLayers<archetype::LayerStatePlanner> &&
              kvc::Cascades<archetype::LayerStatePlanner> &&
              !kvc::PlansLayers<archetype::LayerStatePlanner>);
static_assert(kvc::BudgetPlanner<archetype::SequencePlanner> &&
              kvc::PlansSequence<archetype::SequencePlanner> &&
              !kvc::PlansSequence<archetype::LayerStatePlanner> &&
              !kvc::Cascades<archetype::SequencePlanner>);
static_assert(kvc::EvictionScorer<archetype::MergingScorer> &&
              kvc::MergesEvicted<archetype::MergingScorer> &&
              !kvc::MergesEvicted<archetype::Scorer>);
static_assert(kvc::Quantizer<archetype::SignFlipQuantizer> &&
              kvc::PreparesQueries<archetype::SignFlipQuantizer> &&
              kvc::FinishesOutputs<archetype::SignFlipQuantizer> &&
              !kvc::PreparesQueries<archetype::Quantizer>);

// Archetypes satisfy their role.
static_assert(kvc::EvictionScorer<archetype::Scorer>);
static_assert(kvc::BudgetPlanner<archetype::Planner>);
static_assert(kvc::Quantizer<archetype::Quantizer>);
static_assert(kvc::RetrievalIndex<archetype::SelectiveIndex>);
static_assert(kvc::OffloadBackend<archetype::Offload>);
static_assert(kvc::ComputeBackend<archetype::Backend>);

// The shipped policies satisfy theirs.
static_assert(kvc::EvictionScorer<kvc::evict::Full>);
static_assert(kvc::EvictionScorer<kvc::evict::StreamingLLM>);
static_assert(kvc::EvictionScorer<kvc::evict::H2O>);
static_assert(kvc::ConsumesAttention<kvc::evict::H2O>);
static_assert(!kvc::ConsumesAttention<kvc::evict::StreamingLLM>);
static_assert(kvc::BudgetPlanner<kvc::budget::Uniform>);
static_assert(kvc::Quantizer<kvc::quant::Dense<float>>);
static_assert(kvc::Quantizer<kvc::quant::Dense<Eigen::half>>);
static_assert(kvc::Quantizer<kvc::quant::Dense<Eigen::bfloat16>>);
// Finer attend slices for the formats whose tiles widen codes in registers; the integer
// paths (a setup per tile) keep the coarse ones, also behind a rotation.
static_assert(kvc::UniformTileCost<kvc::quant::Dense<Eigen::half>> &&
              kvc::UniformTileCost<kvc::quant::Fp8E4M3> &&
              kvc::UniformTileCost<kvc::quant::Think<>> &&
              kvc::UniformTileCost<kvc::quant::Rotated<kvc::quant::Dense<float>>> &&
              !kvc::UniformTileCost<kvc::quant::Int8<>> &&
              !kvc::UniformTileCost<kvc::quant::Q8_0> &&
              !kvc::UniformTileCost<kvc::quant::Kivi<2>> &&
              !kvc::UniformTileCost<kvc::quant::Rotated<kvc::quant::Q4_0>> &&
              !kvc::UniformTileCost<archetype::Quantizer>);
static_assert(kvc::RetrievalIndex<kvc::retrieval::Exhaustive>);
static_assert(kvc::OffloadBackend<kvc::offload::None>);
static_assert(kvc::ComputeBackend<kvc::backend::Cpu>);

// A missing member fails the role *and* the named part that says which member.
static_assert(!kvc::EvictionScorer<archetype::ScorerWithoutScore>);
static_assert(!kvc::ScoresTokens<archetype::ScorerWithoutScore>);
static_assert(kvc::TracksAppends<archetype::ScorerWithoutScore>);
static_assert(!kvc::Quantizer<archetype::QuantizerWithoutHalfInput>);
static_assert(!kvc::EncodesFrom<archetype::QuantizerWithoutHalfInput, Eigen::half>);
static_assert(kvc::EncodesFrom<archetype::QuantizerWithoutHalfInput, float>);
static_assert(!kvc::RetrievalIndex<archetype::IndexWithoutSelect>);
static_assert(!kvc::SelectsPages<archetype::IndexWithoutSelect>);
static_assert(!kvc::BudgetPlanner<archetype::Unnamed>);
static_assert(!kvc::NamedPolicy<archetype::Unnamed>);
static_assert(kvc::PlansLayers<archetype::Unnamed>);

// Roles are not interchangeable.
static_assert(!kvc::EvictionScorer<kvc::quant::Dense<float>>);
static_assert(!kvc::Quantizer<kvc::evict::H2O>);

// Defaults are empty and cost the cache nothing ([[no_unique_address]]): swapping one empty
// policy for another does not change the cache's size.
static_assert(std::is_empty_v<kvc::evict::Full> && std::is_empty_v<kvc::quant::Dense<float>> &&
              std::is_empty_v<kvc::retrieval::Exhaustive> && std::is_empty_v<kvc::offload::None> &&
              std::is_empty_v<kvc::budget::Uniform> && std::is_empty_v<kvc::backend::Cpu>);
static_assert(sizeof(kvc::KvCache<>) ==
              sizeof(kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>,
                                  kvc::retrieval::Exhaustive, kvc::offload::None>));

TEST_CASE("policy archetypes plug into KvCache", "[concepts]") {
  // Compiles only if KvCache accepts every role's archetype; the run proves the selective
  // index and the archetype scorer drive a real cache without touching its memory.
  kvc::KvCache<archetype::Scorer, kvc::quant::Dense<float>, archetype::SelectiveIndex,
               archetype::Offload, archetype::Planner>
      cache({.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 8});
  const auto seq = cache.open_sequence();
  std::vector<float> k(8, 1.0F);
  cache.append(seq, 0, kvc::View<const float, 3>(k.data(), {1, 1, 8}),
               kvc::View<const float, 3>(k.data(), {1, 1, 8}));
  std::vector<float> out(8, 0.0F);
  cache.attend(seq, 0, kvc::View<const float, 3>(k.data(), {1, 1, 8}),
               kvc::View<float, 3>(out.data(), {1, 1, 8}));
  // One token: attention is exactly that token's value.
  for (float x : out) CHECK(x == 1.0F);
  // The archetype planner gives every head budget 0: compress empties the layer.
  cache.compress(seq);
  CHECK(cache.tokens(seq, 0, 0) == 0);
}

namespace {

std::vector<float> ramp(std::size_t count, float scale) {
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    values[i] = scale * static_cast<float>((i * 7) % 13) - 3.0F;
  }
  return values;
}

}  // namespace

TEST_CASE("a planner's sequence state sees observe() and cascades to earlier layers",
          "[concepts][planner]") {
  const kvc::Geometry geometry{.layers = 3, .q_heads = 2, .kv_heads = 2, .head_dim = 4};
  kvc::KvCache<kvc::evict::StreamingLLM, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
               kvc::offload::None, archetype::LayerStatePlanner>
      cache(geometry, {.budget = kvc::Budget::tokens(6), .page_tokens = 4});
  const auto seq = cache.open_sequence();
  const auto k = ramp(2 * 12 * 4, 0.5F);
  const auto q = ramp(2 * 2 * 4, 0.25F);
  std::vector<float> out(2 * 2 * 4);
  for (std::size_t layer = 0; layer < 3; ++layer) {
    cache.append(seq, layer, kvc::View<const float, 3>(k.data(), {2, 12, 4}),
                 kvc::View<const float, 3>(k.data(), {2, 12, 4}));
    cache.observe(seq, layer, kvc::View<const float, 3>(q.data(), {2, 2, 4}));
    cache.attend(seq, layer, kvc::View<const float, 3>(q.data(), {2, 2, 4}),
                 kvc::View<float, 3>(out.data(), {2, 2, 4}));
    // After layer l, the l + 1 observed layers share 2·B: each holds 12 / (l + 1), earlier
    // layers included (cascade), later ones are untouched so far.
    for (std::size_t earlier = 0; earlier <= layer; ++earlier) {
      CAPTURE(layer, earlier);
      CHECK(cache.tokens(seq, earlier, 0) == std::min<std::size_t>(12, 12 / (layer + 1)));
      CHECK(cache.tokens(seq, earlier, 1) == std::min<std::size_t>(12, 12 / (layer + 1)));
    }
  }
  // A fork copies the state: its next decode step keeps the same split.
  const auto child = cache.fork(seq);
  cache.append(child, 2, kvc::View<const float, 3>(k.data(), {2, 1, 4}),
               kvc::View<const float, 3>(k.data(), {2, 1, 4}));
  cache.attend(child, 2, kvc::View<const float, 3>(q.data(), {2, 1, 4}),
               kvc::View<float, 3>(out.data(), {2, 1, 4}));
  CHECK(cache.tokens(child, 2, 0) == 4);
}

TEST_CASE("a sequence planner plans every layer at once", "[concepts][planner]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 2, .kv_heads = 2, .head_dim = 4};
  // archetype::Scorer scores every token 0: ties keep the newest.
  kvc::KvCache<archetype::Scorer, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
               kvc::offload::None, archetype::SequencePlanner>
      cache(geometry, {.budget = kvc::Budget::tokens(3), .page_tokens = 4});
  const auto seq = cache.open_sequence();
  const auto k = ramp(2 * 9 * 4, 0.5F);
  std::vector<float> out(2 * 4);
  for (std::size_t layer = 0; layer < 2; ++layer) {
    cache.append(seq, layer, kvc::View<const float, 3>(k.data(), {2, 9, 4}),
                 kvc::View<const float, 3>(k.data(), {2, 9, 4}));
    cache.attend(seq, layer, kvc::View<const float, 3>(k.data(), {2, 1, 4}),
                 kvc::View<float, 3>(out.data(), {2, 1, 4}));
  }
  // Layer 0 stayed whole until the last layer's compression planned both: 1 and 2 tokens.
  CHECK(cache.tokens(seq, 0, 0) == 1);
  CHECK(cache.tokens(seq, 1, 1) == 2);
  CHECK(cache.positions(seq, 1, 0) == std::vector<kvc::Position>{7, 8});
  // A decode step of layer 0 compresses it alone with the recorded plan; compress(seq)
  // plans the whole sequence again.
  cache.append(seq, 0, kvc::View<const float, 3>(k.data(), {2, 1, 4}),
               kvc::View<const float, 3>(k.data(), {2, 1, 4}));
  cache.attend(seq, 0, kvc::View<const float, 3>(k.data(), {2, 1, 4}),
               kvc::View<float, 3>(out.data(), {2, 1, 4}));
  CHECK(cache.positions(seq, 0, 1) == std::vector<kvc::Position>{9});
  CHECK(cache.planner_state(seq).plans == 1);
  cache.compress(seq);
  CHECK(cache.planner_state(seq).plans == 2);
  CHECK(cache.tokens(seq, 0, 1) == 1);
}

TEST_CASE("a merging scorer's rewritten rows are re-encoded copy-on-write", "[concepts][merge]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 4};
  kvc::KvCache<archetype::MergingScorer> cache(
      geometry, {.budget = kvc::Budget::tokens(3), .page_tokens = 2, .auto_compress = false});
  const auto parent = cache.open_sequence();
  const auto values = ramp(6 * 4, 1.0F);
  const auto keys = ramp(6 * 4, 0.5F);
  cache.append(parent, 0, kvc::View<const float, 3>(keys.data(), {1, 6, 4}),
               kvc::View<const float, 3>(values.data(), {1, 6, 4}));
  const auto child = cache.fork(parent);
  cache.compress(child);
  // The child keeps positions 3..5; position 3's value gained those of positions 0..2.
  const kvc::DenseLayer merged = cache.export_dense(child, 0);
  CHECK(merged.positions[0] == std::vector<kvc::Position>{3, 4, 5});
  for (std::size_t c = 0; c < 4; ++c) {
    float expected = values[3 * 4 + c];
    for (std::size_t slot = 0; slot < 3; ++slot) expected += values[slot * 4 + c];
    CHECK(merged.values[0](0, static_cast<Eigen::Index>(c)) == expected);
    CHECK(merged.values[0](1, static_cast<Eigen::Index>(c)) == values[4 * 4 + c]);
    CHECK(merged.keys[0](0, static_cast<Eigen::Index>(c)) == keys[3 * 4 + c]);
  }
  // The parent shared every page: its rows are untouched.
  const kvc::DenseLayer original = cache.export_dense(parent, 0);
  for (std::size_t slot = 0; slot < 6; ++slot) {
    for (std::size_t c = 0; c < 4; ++c) {
      CHECK(original.values[0](static_cast<Eigen::Index>(slot), static_cast<Eigen::Index>(c)) ==
            values[slot * 4 + c]);
    }
  }
}

TEST_CASE("query and output hooks let a format store a transform", "[concepts][quantizer]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
  kvc::KvCache<> plain(geometry);
  kvc::KvCache<kvc::evict::Full, archetype::SignFlipQuantizer> flipped(geometry);
  const auto a = plain.open_sequence();
  const auto b = flipped.open_sequence();
  const auto k = ramp(2 * 5 * 8, 0.3F);
  const auto v = ramp(2 * 5 * 8, 0.7F);
  const auto q = ramp(4 * 2 * 8, 0.2F);
  std::vector<float> out_a(4 * 2 * 8), out_b(4 * 2 * 8);
  plain.append(a, 0, kvc::View<const float, 3>(k.data(), {2, 5, 8}),
               kvc::View<const float, 3>(v.data(), {2, 5, 8}));
  flipped.append(b, 0, kvc::View<const float, 3>(k.data(), {2, 5, 8}),
                 kvc::View<const float, 3>(v.data(), {2, 5, 8}));
  plain.attend(a, 0, kvc::View<const float, 3>(q.data(), {4, 2, 8}),
               kvc::View<float, 3>(out_a.data(), {4, 2, 8}));
  flipped.attend(b, 0, kvc::View<const float, 3>(q.data(), {4, 2, 8}),
                 kvc::View<float, 3>(out_b.data(), {4, 2, 8}));
  // Negation is exact: the outputs are bit-identical.
  CHECK(out_a == out_b);
  CHECK(flipped.export_dense(b, 0).keys[0] == plain.export_dense(a, 0).keys[0]);
}
