// kvc/runtime/recipe.hpp — recipes: a config string names a KvCache composition.
//
//   std::unique_ptr<kvc::AnyCache> cache =
//       kvc::make_cache("snapkv:budget=512,window=32+q4_0", geometry);
//
// builds a KvCache<evict::SnapKV, quant::Q4_0, ...> (exactly: RecipeCache<evict::SnapKV,
// quant::Q4_0>) behind kvc::AnyCache (runtime/any_cache.hpp): the composition a tool or a
// serving config picks at run time, one virtual call per (layer, step) away from the cache.
//
// Grammar (no whitespace anywhere):
//   recipe     = scorer [ "+" quantizer ]  |  quantizer       ("int8" means "full+int8")
//   scorer     = name [ ":" settings ]                        (an empty name means "full")
//   quantizer  = name [ ":" settings ]
//   settings   = key "=" value { "," key "=" value }
// An evicting scorer takes `budget` (tokens per (layer, kv head): an integer is a token
// count, Budget::tokens; a number with a '.' or an exponent is a ratio of the tokens
// seen, Budget::ratio, in (0, 1]), `planner` (uniform by default), its own parameters and
// those of the chosen planner. `full` takes none. recipe_catalog() lists every name, its
// parameters, their defaults and an example; docs/recipes.md is the same as a table.
//
// Errors: kvc::ValueError, naming the bad token and what exists instead ("unknown scorer
// 'h3o' in recipe 'h3o:budget=0.25'; known: full, streaming, h2o, ..."). A recipe that
// parses always builds, except for what only the geometry decides (a quantizer that
// rejects the head_dim: UnsupportedError from KvCache).
//
// Adding a policy is ONE entry in the table of its role at the end of this file
// (recipe_scorers, recipe_planners, recipe_quantizers):
//   RecipeEntry<quant::Q4_0>{"q4_0", "ggml q4_0 blocks: 1.125·d bytes (d % 32 == 0)"},
// A policy whose constructor takes options also specializes RecipeOptions<Policy> (its
// parameters and how they build it), as the shipped scorers do below; one whose variants
// are distinct types lists each under the same name with a fixed setting ("int8" with
// "group=0" and "group=32"). Without editing kvc, a registry of your own works too:
//   constexpr kvc::RecipeRegistry my_recipes{
//       std::tuple_cat(kvc::recipe_scorers, std::tuple{kvc::RecipeEntry<Mine>{"mine", "..."}}),
//       kvc::recipe_planners, kvc::recipe_quantizers};
//   kvc::make_cache("mine:budget=64", geometry, {}, my_recipes);
//
// Compile time: make_cache dispatches the quantizer (a row of recipe_quantizers: one
// detail::build_row), then the scorer, and instantiates one KvCache per (quantizer, scorer):
// 10 × 13 = 130 with the tables below, ≈ 1.7 s each at -O3 (≈ 4 min of CPU for the TU that
// calls it; docs/recipes.md). The planner is chosen at run time inside RecipePlanner: as a
// type it would multiply that. Nothing is instantiated until a TU calls make_cache (it is a
// template), so including this header costs little; call it from one TU. A registry
// listing only the policies you use compiles faster. For the default registry, a program
// can instead compile each row once, in .cpp files of its own (in parallel, and never in
// the TUs that call make_cache):
//   #define KVC_EXTERN_DEFAULT_RECIPES  // in every TU calling make_cache(recipe, geometry[,
//   #include <kvc/runtime/recipe.hpp>   // options]): `extern template`, no row instantiated
// and, for each row n in 0 .. KVC_DEFAULT_RECIPE_ROW_COUNT - 1, in some .cpp (one per row
// compiles in parallel; `KVC_INSTANTIATE_DEFAULT_RECIPES;` is every row in one):
//   #include <kvc/runtime/recipe.hpp>
//   KVC_INSTANTIATE_DEFAULT_RECIPE_ROW(n);
// kvc's own tests and examples do (src/default_recipes.cpp, library kvc_default_recipes).
#pragma once

#include <kvc/budget/ada_kv.hpp>
#include <kvc/budget/cake.hpp>
#include <kvc/budget/duo_attention.hpp>
#include <kvc/budget/prefix_kv.hpp>
#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/budget/uniform.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/geometry.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/cake_indicator.hpp>
#include <kvc/evict/d2o.hpp>
#include <kvc/evict/duo_attention.hpp>
#include <kvc/evict/full.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/key_diff.hpp>
#include <kvc/evict/keyformer.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/lazy_eviction.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/streaming_llm.hpp>
#include <kvc/evict/tova.hpp>
#include <kvc/evict/window_kv.hpp>
#include <kvc/offload/none.hpp>
#include <kvc/quant/dense.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/low_rank.hpp>
#include <kvc/quant/q4_0.hpp>
#include <kvc/quant/q8_0.hpp>
#include <kvc/quant/rotated.hpp>
#include <kvc/quant/think.hpp>
#include <kvc/retrieval/exhaustive.hpp>
#include <kvc/runtime/any_cache.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace kvc {

// ---- parameters ---------------------------------------------------------------------------

// How a parameter's value is written.
enum class RecipeValue {
  count,   // unsigned integer: 64
  real,    // any finite number: 20, 0.5, 1e-3
  amount,  // a token count (integer) or a ratio (with a '.' or an exponent): 64, 0.25
  choice,  // one of RecipeParameter::choices: avg
};

// One parameter a recipe may set on a policy.
struct RecipeParameter {
  std::string_view key;
  RecipeValue kind = RecipeValue::count;
  std::string_view default_value;  // as written in a recipe; "" = none (the key is optional)
  std::string_view description;
  std::string_view choices = {};  // RecipeValue::choice: the allowed values, '|'-separated
};

// One `key=value` of a recipe.
struct RecipeSetting {
  std::string key;
  std::string value;
  friend bool operator==(const RecipeSetting&, const RecipeSetting&) = default;
};

// A parsed `amount`: a token count or a ratio.
struct RecipeAmount {
  bool is_ratio = false;
  std::size_t tokens = 0;  // when !is_ratio
  double fraction = 0.0;   // when is_ratio; ≥ 0
};

namespace detail {

// The ValueError of RecipeArguments::fail: its message already names the recipe, so
// validate_policy passes it on as it is (a policy's own errors it wraps).
class RecipeValueError : public ValueError {
 public:
  using ValueError::ValueError;
};

inline bool is_digits(std::string_view text) noexcept {
  return !text.empty() &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

inline std::optional<std::size_t> parse_count(std::string_view text) noexcept {
  std::size_t value = 0;
  if (!is_digits(text)) return std::nullopt;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc{} || end != text.data() + text.size()) return std::nullopt;
  return value;
}

inline std::optional<double> parse_real(std::string_view text) noexcept {
  double value = 0.0;
  if (text.empty()) return std::nullopt;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc{} || end != text.data() + text.size() || !std::isfinite(value)) {
    return std::nullopt;
  }
  return value;
}

inline std::optional<RecipeAmount> parse_amount(std::string_view text) noexcept {
  if (is_digits(text)) {
    const auto tokens = parse_count(text);
    if (!tokens) return std::nullopt;
    return RecipeAmount{false, *tokens, 0.0};
  }
  const auto fraction = parse_real(text);
  if (!fraction || *fraction < 0.0) return std::nullopt;
  return RecipeAmount{true, 0, *fraction};
}

// A ratio written so that it reads back as a ratio ("1.0", not "1").
inline std::string format_ratio(double fraction) {
  std::string text = fmt::format("{}", fraction);
  if (is_digits(text)) text += ".0";
  return text;
}

inline bool has_choice(std::string_view choices, std::string_view value) noexcept {
  while (!choices.empty()) {
    const std::size_t bar = choices.find('|');
    if (choices.substr(0, bar) == value) return true;
    if (bar == std::string_view::npos) break;
    choices.remove_prefix(bar + 1);
  }
  return false;
}

inline std::string_view value_grammar(const RecipeParameter& parameter) noexcept {
  switch (parameter.kind) {
    case RecipeValue::count:
      return "an unsigned integer";
    case RecipeValue::real:
      return "a finite number";
    case RecipeValue::amount:
      return "a token count (integer) or a ratio (with a '.')";
    case RecipeValue::choice:
      break;
  }
  return "one of the choices";
}

// `text` in its canonical spelling, or nullopt if it is not a valid value of `parameter`.
inline std::optional<std::string> canonical_value(const RecipeParameter& parameter,
                                                  std::string_view text) {
  switch (parameter.kind) {
    case RecipeValue::count:
      if (const auto value = parse_count(text)) return fmt::format("{}", *value);
      return std::nullopt;
    case RecipeValue::real:
      if (const auto value = parse_real(text)) return fmt::format("{}", *value);
      return std::nullopt;
    case RecipeValue::amount:
      if (const auto value = parse_amount(text)) {
        return value->is_ratio ? format_ratio(value->fraction) : fmt::format("{}", value->tokens);
      }
      return std::nullopt;
    case RecipeValue::choice:
      if (has_choice(parameter.choices, text)) return std::string(text);
      return std::nullopt;
  }
  return std::nullopt;
}

inline std::string budget_text(const Budget& budget) {
  return budget.kind() == Budget::Kind::ratio ? format_ratio(budget.fraction())
                                              : fmt::format("{}", budget.token_count());
}

// ":k=v,k=v", or "" when there are none.
inline std::string settings_text(const std::vector<RecipeSetting>& settings) {
  std::string text;
  for (const RecipeSetting& setting : settings) {
    text += (text.empty() ? ":" : ",") + setting.key + '=' + setting.value;
  }
  return text;
}

// The items of `range` as name(item), separated.
template <class Range, class Name>
std::string join(const Range& range, std::string_view separator, Name name) {
  std::string text;
  for (const auto& item : range) {
    if (!text.empty()) text += separator;
    text += name(item);
  }
  return text;
}

}  // namespace detail

// What a policy's RecipeOptions::make reads: the recipe's settings for it, with the
// declared defaults filling in. Every value was validated against its RecipeValue by the
// parser; fail() reports a constraint across values (ValueError naming the recipe).
class RecipeArguments {
 public:
  RecipeArguments(std::string_view recipe, std::string_view policy,
                  std::span<const RecipeParameter> parameters,
                  std::span<const RecipeSetting> settings) noexcept
      : recipe_(recipe), policy_(policy), parameters_(parameters), settings_(settings) {}

  std::string_view recipe() const noexcept { return recipe_; }
  std::string_view policy() const noexcept { return policy_; }

  // Whether the recipe sets `key` (to a value other than its default).
  bool has(std::string_view key) const noexcept { return given(key) != nullptr; }

  std::size_t count(std::string_view key) const { return *detail::parse_count(text(key)); }
  double real(std::string_view key) const { return *detail::parse_real(text(key)); }
  RecipeAmount amount(std::string_view key) const { return *detail::parse_amount(text(key)); }
  std::string_view choice(std::string_view key) const { return text(key); }

  template <class... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    detail::fail<detail::RecipeValueError>("recipe '{}': {}", recipe_,
                                           fmt::format(format, std::forward<Args>(args)...));
  }

 private:
  const RecipeSetting* given(std::string_view key) const noexcept {
    for (const RecipeSetting& setting : settings_) {
      if (setting.key == key) return &setting;
    }
    return nullptr;
  }

  std::string_view text(std::string_view key) const {
    if (const RecipeSetting* setting = given(key)) return setting->value;
    for (const RecipeParameter& parameter : parameters_) {
      if (parameter.key == key && !parameter.default_value.empty()) return parameter.default_value;
    }
    detail::fail<Error>("RecipeArguments: {} reads '{}', which it does not declare with a default",
                        policy_, key);
  }

  std::string_view recipe_;
  std::string_view policy_;
  std::span<const RecipeParameter> parameters_;
  std::span<const RecipeSetting> settings_;
};

// What a recipe can set on a policy: specialize for a policy whose constructor takes
// options (like fmt::formatter). Members:
//   static constexpr std::array<RecipeParameter, N> parameters;
//   static Policy make(const RecipeArguments&);
//   static std::optional<Budget> budget(const RecipeArguments&, std::optional<Budget> given);
//       optional, scorers only: the budget the recipe means when parameters imply one
//       (streaming: sink + window); `given` is the recipe's `budget=`, if any.
//   static constexpr std::string_view planner;
//   static Planner make_planner(const RecipeArguments&);
//       optional, scorers only: the scorer needs its own planner (duo: retrieval heads keep
//       every token), always the planner of that name, built from the scorer's arguments.
// The primary template: no parameters, a default-constructed policy.
template <class Policy>
struct RecipeOptions {
  static constexpr std::array<RecipeParameter, 0> parameters{};
  static Policy make(const RecipeArguments&) { return Policy{}; }
};

// One row of a recipe table: `Policy` under `name`. `fixed` selects among types listed
// under one name ("group=32"); it is "" when the name has a single type.
template <class Policy>
struct RecipeEntry {
  using policy_type = Policy;
  std::string_view name;
  std::string_view summary;
  std::string_view fixed = {};
};

// The three tables a recipe is looked up in (tuples of RecipeEntry; the first planner and
// the first quantizer are the defaults). kvc::default_recipes is the shipped one.
template <class Scorers, class Planners, class Quantizers>
struct RecipeRegistry {
  Scorers scorers;
  Planners planners;
  Quantizers quantizers;
};
template <class Scorers, class Planners, class Quantizers>
RecipeRegistry(Scorers, Planners, Quantizers) -> RecipeRegistry<Scorers, Planners, Quantizers>;

// The planner of a recipe cache whose scorer evicts: one of Planners, chosen at run time
// (one std::visit per layer compression check). Recipes dispatch the planner here rather
// than in the type so that make_cache instantiates |scorers| × |quantizers| KvCaches, not
// × |planners| as well: each costs ~0.85 s of -O2 compile time. A recipe cache with an
// evicting scorer is KvCache<Scorer, Quant, retrieval::Exhaustive, offload::None,
// RecipePlanner<...>> (kvc::RecipeCache below); one whose scorer keeps every token uses
// the first planner itself, so make_cache("full") is exactly a KvCache<>.
namespace detail {
// RecipePlanner's SequenceState: one per alternative (only the chosen one is used), present
// only when some alternative has one (CAKE, PrefixKV), so that a recipe cache without such
// a planner stores nothing per sequence.
template <bool Stateful, class... Planners>
struct RecipePlannerState {};
template <class... Planners>
struct RecipePlannerState<true, Planners...> {
  using SequenceState = std::tuple<typename sequence_state<Planners>::type...>;
};
}  // namespace detail

template <BudgetPlanner... Planners>
class RecipePlanner
    : public detail::RecipePlannerState<(HasSequenceState<Planners> || ...), Planners...> {
  static constexpr bool stateful = (HasSequenceState<Planners> || ...);

 public:
  static_assert(sizeof...(Planners) >= 1, "RecipePlanner: no planner");
  static constexpr std::string_view name() noexcept { return "recipe"; }
  // Cascades when one of Planners does (CAKE); for another choice the extra check of the
  // earlier layers finds none over budget (they were compressed at their own step).
  static constexpr bool cascades = (Cascades<Planners> || ...);

  RecipePlanner() = default;
  template <class Planner>
    requires(std::is_same_v<Planner, Planners> || ...)
  explicit RecipePlanner(Planner planner) : planner_(std::move(planner)) {}

  // The chosen planner's name ("uniform" is budget::Uniform::name()).
  std::string_view chosen_name() const noexcept {
    return std::visit([](const auto& planner) { return std::string_view(planner.name()); },
                      planner_);
  }
  const std::variant<Planners...>& chosen() const noexcept { return planner_; }

  void plan_layer(const LayerPlan& plan, std::span<std::size_t> head_budgets) requires(!stateful) {
    std::visit([&](auto& planner) { planner.plan_layer(plan, head_budgets); }, planner_);
  }

  // With a SequenceState: the chosen planner gets its own element of the tuple.
  template <class State>
    requires(stateful&& std::is_same_v<State, typename RecipePlanner::SequenceState>)
  void plan_layer(const LayerPlan& plan, const State& state, std::span<std::size_t> head_budgets) {
    with_chosen([&]<std::size_t I>(auto& planner) {
      if constexpr (HasSequenceState<std::remove_cvref_t<decltype(planner)>>) {
        planner.plan_layer(plan, std::get<I>(state), head_budgets);
      } else {
        planner.plan_layer(plan, head_budgets);
      }
    });
  }

  // Only the chosen alternative's state counts (the others stay default-constructed).
  template <class State>
    requires(stateful&& std::is_same_v<State, typename RecipePlanner::SequenceState>)
  std::size_t state_bytes(const State& state)
  const {
    std::size_t bytes = 0;
    with_chosen([&]<std::size_t I>(const auto& planner) {
      using Chosen = std::remove_cvref_t<decltype(planner)>;
      if constexpr (ReportsSequenceStateBytes<Chosen>) {
        bytes = planner.state_bytes(std::get<I>(state));
      } else if constexpr (HasSequenceState<Chosen>) {
        bytes = sizeof(typename Chosen::SequenceState);
      }
    });
    return bytes;
  }

  template <class State>
    requires((ObservesLayers<Planners> || ...) &&
             std::is_same_v<State, typename RecipePlanner::SequenceState>)
  void on_observe(State& state, const ObserveEvent& event) {
    with_chosen([&]<std::size_t I>(auto& planner) {
      if constexpr (ObservesLayers<std::remove_cvref_t<decltype(planner)>>) {
        planner.on_observe(std::get<I>(state), event);
      }
    });
  }

  template <class State>
    requires((PlansSequence<Planners> || ...) &&
             std::is_same_v<State, typename RecipePlanner::SequenceState>)
  bool wants_sequence_plan(const State& state, const LayerPlan& plan) const {
    bool wants = false;
    with_chosen([&]<std::size_t I>(const auto& planner) {
      if constexpr (PlansSequence<std::remove_cvref_t<decltype(planner)>>) {
        wants = static_cast<bool>(planner.wants_sequence_plan(std::get<I>(state), plan));
      }
    });
    return wants;
  }

  template <class State>
    requires((PlansSequence<Planners> || ...) &&
             std::is_same_v<State, typename RecipePlanner::SequenceState>)
  void plan_sequence(State& state, const SequencePlan& plan) {
    with_chosen([&]<std::size_t I>(auto& planner) {
      if constexpr (PlansSequence<std::remove_cvref_t<decltype(planner)>>) {
        planner.plan_sequence(std::get<I>(state), plan);
      }
    });
  }

  // PlansFromScores, when one of Planners is (AdaKV): whether the chosen one wants the
  // scorer's scores. Other choices are planned exactly as without it (no scoring pass).
  bool wants_scores() const noexcept requires(PlansFromScores<Planners> || ...) {
    return std::visit(
        [](const auto& planner) {
          if constexpr (PlansFromScores<std::remove_cvref_t<decltype(planner)>>) {
            return static_cast<bool>(planner.wants_scores());
          } else {
            return false;
          }
        },
        planner_);
  }

 private:
  // f.template operator()<I>(planner) for the chosen alternative I.
  template <class F>
  void with_chosen(F&& f) {
    with_chosen(std::forward<F>(f), std::index_sequence_for<Planners...>{});
  }
  template <class F>
  void with_chosen(F&& f) const {
    with_chosen(std::forward<F>(f), std::index_sequence_for<Planners...>{});
  }
  template <class F, std::size_t... I>
  void with_chosen(F&& f, std::index_sequence<I...>) {
    (void)((planner_.index() == I && (f.template operator()<I>(std::get<I>(planner_)), true)) ||
           ...);
  }
  template <class F, std::size_t... I>
  void with_chosen(F&& f, std::index_sequence<I...>) const {
    (void)((planner_.index() == I && (f.template operator()<I>(std::get<I>(planner_)), true)) ||
           ...);
  }

  std::variant<Planners...> planner_;
};

// ---- the shipped policies' parameters -----------------------------------------------------

template <>
struct RecipeOptions<evict::StreamingLLM> {
  static constexpr std::array parameters{
      RecipeParameter{"sink", RecipeValue::count, "4", "first positions always kept"},
      RecipeParameter{"window", RecipeValue::count, "",
                      "newest tokens kept after the sinks: budget = sink + window (instead of "
                      "budget)"}};
  static evict::StreamingLLM make(const RecipeArguments& args) {
    return evict::StreamingLLM({.sink = args.count("sink")});
  }
  static std::optional<Budget> budget(const RecipeArguments& args, std::optional<Budget> given) {
    if (!args.has("window")) return given;
    if (given) args.fail("streaming: set budget or window (budget = sink + window), not both");
    return Budget::tokens(args.count("sink") + args.count("window"));
  }
};

template <>
struct RecipeOptions<evict::H2O> {
  static constexpr std::array parameters{
      RecipeParameter{"recent", RecipeValue::amount, "0.5",
                      "recent window: tokens (integer) or share of the budget (ratio in [0, 1])"}};
  static evict::H2O make(const RecipeArguments& args) {
    const RecipeAmount recent = args.amount("recent");
    if (recent.is_ratio && recent.fraction > 1.0) {
      args.fail("h2o: recent={} is a ratio above 1", detail::format_ratio(recent.fraction));
    }
    if (recent.is_ratio) {
      return evict::H2O({.recent_fraction = recent.fraction, .recent_tokens = 0});
    }
    if (recent.tokens == 0) {  // H2O's recent_tokens = 0 means "use the fraction"
      return evict::H2O({.recent_fraction = 0.0, .recent_tokens = 0});
    }
    return evict::H2O({.recent_fraction = 0.5, .recent_tokens = recent.tokens});
  }
};

template <>
struct RecipeOptions<evict::SnapKV> {
  static constexpr std::array parameters{
      RecipeParameter{"window", RecipeValue::count, "64",
                      "observation window w, always kept, counted in the budget"},
      RecipeParameter{"kernel", RecipeValue::count, "5", "pooling kernel (odd)"},
      RecipeParameter{"pooling", RecipeValue::choice, "avg", "pooling of the window votes",
                      "avg|max"}};
  static evict::SnapKV make(const RecipeArguments& args) {
    return evict::SnapKV({.window = args.count("window"),
                          .kernel = args.count("kernel"),
                          .pooling = args.choice("pooling") == "max"
                                         ? evict::SnapKV::Pooling::max
                                         : evict::SnapKV::Pooling::avg});
  }
};

template <>
struct RecipeOptions<evict::WindowKV> {
  static constexpr std::array parameters{
      RecipeParameter{"window", RecipeValue::count, "64",
                      "observation window w, always kept, counted in the budget"},
      RecipeParameter{"kernel", RecipeValue::count, "5", "pooling kernel (odd)"},
      RecipeParameter{"pooling", RecipeValue::choice, "avg", "pooling of the window votes",
                      "avg|max"},
      RecipeParameter{"block", RecipeValue::count, "8",
                      "c: consecutive positions per selection window"}};
  static evict::WindowKV make(const RecipeArguments& args) {
    return evict::WindowKV({.window = args.count("window"),
                            .kernel = args.count("kernel"),
                            .pooling = args.choice("pooling") == "max"
                                           ? evict::WindowKV::Pooling::max
                                           : evict::WindowKV::Pooling::avg,
                            .block = args.count("block")});
  }
};

// The roles of a recipe are a pattern (a roles file path does not fit the grammar, whose
// values are numbers and choices, and make() does not see the geometry): head (l, h) is
// retrieval when (l + h) % retrieval_every == 0. Calibrated roles: build the KvCache in
// code (evict::HeadRoles::load, evict::calibrate_head_roles).
template <>
struct RecipeOptions<evict::DuoAttention> {
  static constexpr std::array parameters{
      RecipeParameter{"sink", RecipeValue::count, "64", "first positions a streaming head keeps"},
      RecipeParameter{"recent", RecipeValue::count, "256",
                      "newest tokens a streaming head keeps: budget = sink + recent (unless "
                      "budget caps it lower)"},
      RecipeParameter{"retrieval_every", RecipeValue::count, "2",
                      "head (layer, h) is retrieval when (layer + h) % retrieval_every == 0"}};
  static constexpr std::string_view planner = "duo";
  static evict::DuoAttention make(const RecipeArguments& args) {
    if (args.count("retrieval_every") == 0) args.fail("duo: retrieval_every is 0");
    return evict::DuoAttention(evict::HeadRoles::alternating(args.count("retrieval_every")),
                               {.sink = args.count("sink")});
  }
  static budget::DuoAttention make_planner(const RecipeArguments& args) {
    return budget::DuoAttention(evict::HeadRoles::alternating(args.count("retrieval_every")),
                                {.sink = args.count("sink"), .recent = args.count("recent")});
  }
  static std::optional<Budget> budget(const RecipeArguments& args, std::optional<Budget> given) {
    if (given) return given;
    return Budget::tokens(args.count("sink") + args.count("recent"));
  }
};

template <>
struct RecipeOptions<evict::D2O<evict::H2O>> {
  static constexpr std::array parameters{
      RecipeParameter{"recent", RecipeValue::amount, "0.5",
                      "H2O's recent window: tokens (integer) or share of the budget (ratio)"},
      RecipeParameter{"merge_alpha", RecipeValue::real, "0.5",
                      "weight of the previous merge threshold"},
      RecipeParameter{"merge_beta", RecipeValue::real, "0.5",
                      "weight of the new mean similarity in the threshold"}};
  static evict::D2O<evict::H2O> make(const RecipeArguments& args) {
    return evict::D2O<evict::H2O>(
        RecipeOptions<evict::H2O>::make(args),
        {.alpha = args.real("merge_alpha"), .beta = args.real("merge_beta")});
  }
};

template <>
struct RecipeOptions<evict::Knorm> {
  static constexpr std::array parameters{
      RecipeParameter{"recent", RecipeValue::count, "0", "newest tokens always kept"}};
  static evict::Knorm make(const RecipeArguments& args) {
    return evict::Knorm({.recent = args.count("recent")});
  }
};

template <>
struct RecipeOptions<evict::KeyDiff> {
  static constexpr std::array parameters{
      RecipeParameter{"recent", RecipeValue::count, "0", "newest tokens always kept"}};
  static evict::KeyDiff make(const RecipeArguments& args) {
    return evict::KeyDiff({.recent = args.count("recent")});
  }
};

template <>
struct RecipeOptions<budget::AdaKV> {
  static constexpr std::array parameters{RecipeParameter{
      "alpha", RecipeValue::real, "0.2", "share of the budget each head keeps of its own (0..1)"}};
  static budget::AdaKV make(const RecipeArguments& args) {
    return budget::AdaKV({.alpha = args.real("alpha")});
  }
};

template <>
struct RecipeOptions<budget::PyramidKV> {
  static constexpr std::array parameters{
      RecipeParameter{"pyramid_window", RecipeValue::count, "64",
                      "tokens every layer keeps on top of its pyramid share"},
      RecipeParameter{"beta", RecipeValue::real, "20", "max/min ratio knob (≥ 1)"}};
  static budget::PyramidKV make(const RecipeArguments& args) {
    return budget::PyramidKV({.window = args.count("pyramid_window"), .beta = args.real("beta")});
  }
};

template <>
struct RecipeOptions<budget::Cake> {
  static constexpr std::array parameters{
      RecipeParameter{
          "cake_window", RecipeValue::count, "32",
          "window rows CAKE measures, and tokens every layer keeps on top of its share"},
      RecipeParameter{"tau1", RecipeValue::real, "1", "temperature of the dispersion (> 0)"},
      RecipeParameter{"tau2", RecipeValue::real, "1", "temperature of the shift (> 0)"}};
  static budget::Cake make(const RecipeArguments& args) {
    if (!(args.real("tau1") > 0.0) || !(args.real("tau2") > 0.0)) {
      args.fail("cake planner: tau1 and tau2 must be > 0");
    }
    return budget::Cake({.window = args.count("cake_window"),
                         .tau1 = args.real("tau1"),
                         .tau2 = args.real("tau2")});
  }
};

template <>
struct RecipeOptions<quant::LowRankKeys<>> {
  static constexpr std::array parameters{RecipeParameter{
      "rank", RecipeValue::count, "32", "r: fp16 coefficients per key, 1..256 and ≤ head_dim"}};
  static quant::LowRankKeys<> make(const RecipeArguments& args) {
    return quant::LowRankKeys<>(args.count("rank"));  // the constructor checks the range
  }
};

template <>
struct RecipeOptions<quant::Think<>> {
  static constexpr std::array parameters{RecipeParameter{
      "lambda", RecipeValue::real, "0.4", "λ: the share of key channels pruned, in [0, 1)"}};
  static quant::Think<> make(const RecipeArguments& args) {
    return quant::Think<>(static_cast<float>(args.real("lambda")));  // it checks the range
  }
};

// ---- the tables: ONE entry per policy ----------------------------------------------------

inline constexpr std::tuple recipe_scorers{
    RecipeEntry<evict::Full>{"full", "keep every token (the default; takes no budget)"},
    RecipeEntry<evict::StreamingLLM>{"streaming", "attention sinks + the newest tokens"},
    RecipeEntry<evict::H2O>{"h2o", "heavy hitters (accumulated attention) + a recent window"},
    RecipeEntry<evict::SnapKV>{"snapkv", "window queries' pooled votes + the window (observe)"},
    RecipeEntry<evict::TOVA>{"tova", "the tokens the latest query attends to most"},
    RecipeEntry<evict::Knorm>{"knorm", "the lowest-norm keys"},
    RecipeEntry<evict::KeyDiff>{"keydiff", "the keys least like the mean key direction"},
    RecipeEntry<evict::Keyformer>{"keyformer", "accumulated Gumbel-regularized attention"},
    RecipeEntry<evict::LazyEviction>{"lazy", "tokens due to recur (recurrence intervals)"},
    RecipeEntry<evict::CakeIndicator>{"cake", "window attention mean + 200·variance (observe)"},
    RecipeEntry<evict::WindowKV>{"windowkv", "whole 8-token windows by summed SnapKV votes"},
    RecipeEntry<evict::DuoAttention>{"duo", "retrieval heads keep all, others sink + recent"},
    RecipeEntry<evict::D2O<evict::H2O>>{"d2o", "H2O, evicted tokens merged into similar ones"}};

inline constexpr std::tuple recipe_planners{
    RecipeEntry<budget::Uniform>{"uniform", "the same budget for every layer (the default)"},
    RecipeEntry<budget::PyramidKV>{"pyramid", "PyramidKV: budgets shrinking linearly with depth"},
    RecipeEntry<budget::DuoAttention>{"duo", "DuoAttention: retrieval heads all, others 64 + 256"},
    RecipeEntry<budget::AdaKV>{"adakv", "AdaKV: a layer's budget split across heads by score"},
    RecipeEntry<budget::Cake>{"cake", "CAKE: layer shares from window-attention dispersion"},
    RecipeEntry<budget::PrefixKV>{"prefixkv", "PrefixKV: one global importance coverage p"}};

// Bytes per token and kv head, K + V, at head_dim d.
inline constexpr std::tuple recipe_quantizers{
    RecipeEntry<quant::Dense<float>>{"f32", "fp32, exact: 8·d bytes (the default)"},
    RecipeEntry<quant::Dense<Eigen::half>>{"f16", "fp16: 4·d bytes"},
    RecipeEntry<quant::Dense<Eigen::bfloat16>>{"bf16", "bf16: 4·d bytes"},
    RecipeEntry<quant::Int8<>>{"int8", "int8, one scale per token: 2·d + 8 bytes", "group=0"},
    RecipeEntry<quant::Int8<32>>{"int8", "int8, a scale per 32 channels: 2.25·d bytes", "group=32"},
    RecipeEntry<quant::Q8_0>{"q8_0", "ggml q8_0 blocks: 2.125·d bytes (d % 32 == 0)"},
    RecipeEntry<quant::Q4_0>{"q4_0", "ggml q4_0 blocks: 1.125·d bytes (d % 32 == 0)"},
    RecipeEntry<quant::Rotated<quant::Q4_0>>{
        "rot_q4_0", "q4_0 of Hadamard-rotated K/V: 1.125·d bytes (d a power of 2, ≤ 256)"},
    RecipeEntry<quant::Fp8E4M3>{"fp8", "FP8 E4M3, fp32 scale per token: 2·d + 8 bytes"},
    RecipeEntry<quant::Fp8E5M2>{"fp8_e5m2", "FP8 E5M2, fp32 scale per token: 2·d + 8 bytes"},
    RecipeEntry<quant::Kivi<2>>{"kivi",
                                "KIVI 2-bit: keys per channel, values per token, groups of 32, "
                                "the newest 128 in fp32: 0.75·d bytes (d % 32 == 0)",
                                "bits=2"},
    RecipeEntry<quant::Kivi<4>>{"kivi",
                                "KIVI 4-bit: keys per channel, values per token, groups of 32, "
                                "the newest 128 in fp32: 1.25·d bytes (d % 32 == 0)",
                                "bits=4"},
    RecipeEntry<quant::LowRankKeys<>>{
        "lowrank",
        "keys as r fp16 coefficients in a per-head SVD basis of the prefill keys, "
        "values fp16, the newest 128 in fp32: 2·(r + d) bytes"},
    RecipeEntry<quant::Think<>>{"think",
                                "ThinK: keys pruned to the channels the window queries use "
                                "(call observe), values fp16, the newest 32 whole"}};

inline constexpr RecipeRegistry default_recipes{recipe_scorers, recipe_planners, recipe_quantizers};

using DefaultRecipes = std::remove_const_t<decltype(default_recipes)>;

namespace detail {
template <class Table>
struct RecipePlannerOf;
}  // namespace detail

// The KvCache type make_cache builds for (Scorer, Quant) from a registry: what
// `CacheModel<RecipeCache<...>>` a dynamic_cast of its AnyCache finds.
template <EvictionScorer Scorer, Quantizer Quant, class Registry = DefaultRecipes>
using RecipeCache = KvCache<
    Scorer, Quant, retrieval::Exhaustive, offload::None,
    std::conditional_t<
        Scorer::evicts, typename detail::RecipePlannerOf<decltype(Registry::planners)>::type,
        typename std::tuple_element_t<0, decltype(Registry::planners)>::policy_type>>;

// ---- parsed recipes ----------------------------------------------------------------------

// What parse_recipe reads from a recipe, in canonical form: settings equal to their
// default are dropped, the rest are in declaration order (the scorer's, then the
// planner's), numbers are spelled one way. Two recipes that build the same cache compare
// equal; to_string() reads back to an equal RecipeSpec.
struct RecipeSpec {
  std::string scorer = "full";
  std::optional<Budget> budget;  // `budget=` as written; nullopt when the recipe has none
  std::string planner = "uniform";
  std::vector<RecipeSetting> settings;  // the scorer's and planner's other parameters
  std::string quantizer = "f32";
  std::vector<RecipeSetting> quantizer_settings;

  std::string to_string() const {
    const RecipeSpec defaults;
    std::vector<RecipeSetting> items;
    if (budget) items.push_back({"budget", detail::budget_text(*budget)});
    if (planner != defaults.planner) items.push_back({"planner", planner});
    items.insert(items.end(), settings.begin(), settings.end());
    std::string text = scorer + detail::settings_text(items);
    if (quantizer != defaults.quantizer || !quantizer_settings.empty()) {
      text += '+' + quantizer + detail::settings_text(quantizer_settings);
    }
    return text;
  }

  friend bool operator==(const RecipeSpec& a, const RecipeSpec& b) {
    const auto same_budget = [](const std::optional<Budget>& x, const std::optional<Budget>& y) {
      if (!x || !y) return !x && !y;
      return x->kind() == y->kind() && x->token_count() == y->token_count() &&
             x->fraction() == y->fraction();
    };
    return a.scorer == b.scorer && same_budget(a.budget, b.budget) && a.planner == b.planner &&
           a.settings == b.settings && a.quantizer == b.quantizer &&
           a.quantizer_settings == b.quantizer_settings;
  }
};

// One policy of the catalog: what recipe_catalog() returns.
struct RecipeInfo {
  enum class Role { scorer, planner, quantizer };
  struct Parameter {
    std::string key;
    RecipeValue kind = RecipeValue::count;
    std::string default_value;  // "" = none
    std::string description;
    std::string choices;  // RecipeValue::choice: '|'-separated
  };
  Role role = Role::scorer;
  std::string name;
  std::string summary;
  std::vector<Parameter> parameters;  // scorers: budget and planner first (if it evicts)
  std::string example;                // a recipe that builds this entry
};

namespace detail {

// What the parser needs of one table entry, without its type.
struct PolicyInfo {
  std::string_view name;
  std::string_view summary;
  std::string_view fixed;
  std::span<const RecipeParameter> parameters;
  bool evicts = false;
  // Constructs the policy from its arguments: only to run its own checks.
  void (*validate)(const RecipeArguments&) = nullptr;
  // RecipeOptions::budget, or the identity.
  std::optional<Budget> (*budget)(const RecipeArguments&, std::optional<Budget>) = nullptr;
  // RecipeOptions::planner: the planner this scorer always uses; "" = any (the recipe's).
  std::string_view planner = {};
};

template <class Policy>
concept ImpliesBudget = requires(const RecipeArguments& args, std::optional<Budget> given) {
  { RecipeOptions<Policy>::budget(args, given) } -> std::same_as<std::optional<Budget>>;
};

template <class Policy>
concept BringsPlanner = requires {
  { RecipeOptions<Policy>::planner } -> std::convertible_to<std::string_view>;
};

// The scorer's RecipeOptions builds `Planner` itself (make_planner).
template <class Scorer, class Planner>
concept MakesPlanner = requires(const RecipeArguments& args) {
  { RecipeOptions<Scorer>::make_planner(args) } -> std::same_as<Planner>;
};

template <class Policy>
PolicyInfo policy_info(const RecipeEntry<Policy>& entry) {
  PolicyInfo info{entry.name, entry.summary, entry.fixed, RecipeOptions<Policy>::parameters};
  if constexpr (BringsPlanner<Policy>) info.planner = RecipeOptions<Policy>::planner;
  if constexpr (EvictionScorer<Policy>) info.evicts = Policy::evicts;
  info.validate = [](const RecipeArguments& args) { (void)RecipeOptions<Policy>::make(args); };
  info.budget = [](const RecipeArguments& args, std::optional<Budget> given) {
    if constexpr (ImpliesBudget<Policy>) {
      return RecipeOptions<Policy>::budget(args, given);
    } else {
      (void)args;
      return given;
    }
  };
  return info;
}

template <class Table>
auto table_info(const Table& table) {
  return std::apply(
      [](const auto&... entry) {
        return std::array<PolicyInfo, sizeof...(entry)>{policy_info(entry)...};
      },
      table);
}

template <class Infos>
std::string known_names(const Infos& infos) {
  std::vector<std::string_view> names;
  for (const PolicyInfo& info : infos) {
    if (std::find(names.begin(), names.end(), info.name) == names.end()) names.push_back(info.name);
  }
  return join(names, ", ", [](std::string_view name) { return std::string(name); });
}

template <class Infos>
std::optional<std::size_t> find_name(const Infos& infos, std::string_view name) {
  for (std::size_t i = 0; i < infos.size(); ++i) {
    if (infos[i].name == name) return i;
  }
  return std::nullopt;
}

inline const RecipeParameter* find_parameter(std::span<const RecipeParameter> parameters,
                                             std::string_view key) noexcept {
  for (const RecipeParameter& parameter : parameters) {
    if (parameter.key == key) return &parameter;
  }
  return nullptr;
}

// "name:k=v,k=v" split into its name and settings, checking the syntax only.
struct RecipePart {
  std::string_view name;
  std::vector<std::pair<std::string_view, std::string_view>> settings;
};

inline RecipePart split_part(std::string_view text, std::string_view recipe,
                             std::string_view role) {
  RecipePart part;
  const std::size_t colon = text.find(':');
  part.name = text.substr(0, colon);
  if (colon == std::string_view::npos) return part;
  if (part.name.empty()) fail<ValueError>("empty {} name before ':' in recipe '{}'", role, recipe);
  std::string_view list = text.substr(colon + 1);
  if (list.empty()) {
    fail<ValueError>("empty parameter list after '{}:' in recipe '{}'; write {}:key=value",
                     part.name, recipe, part.name);
  }
  while (true) {
    const std::size_t comma = list.find(',');
    const std::string_view item = list.substr(0, comma);
    const std::size_t equals = item.find('=');
    if (item.empty()) {
      fail<ValueError>("empty parameter in '{}' of recipe '{}' (a stray ',')", text, recipe);
    }
    if (equals == std::string_view::npos) {
      fail<ValueError>("parameter '{}' in recipe '{}' has no value; write key=value", item, recipe);
    }
    const std::string_view key = item.substr(0, equals);
    const std::string_view value = item.substr(equals + 1);
    if (key.empty() || value.empty() || value.find_first_of("=:") != std::string_view::npos) {
      fail<ValueError>("malformed parameter '{}' in recipe '{}'; write key=value", item, recipe);
    }
    for (const auto& [seen, unused] : part.settings) {
      (void)unused;
      if (seen == key) fail<ValueError>("duplicate parameter '{}' in recipe '{}'", key, recipe);
    }
    part.settings.emplace_back(key, value);
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return part;
}

inline std::string parameter_keys(std::span<const RecipeParameter> parameters) {
  return join(parameters, ", ", [](const RecipeParameter& p) { return std::string(p.key); });
}

// The canonical value of `key=value` for `parameter`, or a ValueError.
inline std::string checked_value(const RecipeParameter& parameter, std::string_view value,
                                 std::string_view recipe) {
  if (auto canonical = canonical_value(parameter, value)) return *std::move(canonical);
  if (parameter.kind == RecipeValue::choice) {
    fail<ValueError>("bad value '{}' for '{}' in recipe '{}'; choices: {}", value, parameter.key,
                     recipe, parameter.choices);
  }
  fail<ValueError>("malformed value '{}' for '{}' in recipe '{}'; expected {}", value,
                   parameter.key, recipe, value_grammar(parameter));
}

inline Budget checked_budget(std::string_view value, std::string_view recipe) {
  const auto amount = parse_amount(value);
  if (!amount) {
    fail<ValueError>(
        "malformed budget '{}' in recipe '{}'; expected a token count ≥ 1 (integer) or a ratio in "
        "(0, 1] (with a '.')",
        value, recipe);
  }
  if (!amount->is_ratio) {
    if (amount->tokens == 0) {
      fail<ValueError>(
          "budget '{}' in recipe '{}' is 0 tokens; expected a token count ≥ 1 or a "
          "ratio in (0, 1]",
          value, recipe);
    }
    return Budget::tokens(amount->tokens);
  }
  if (!(amount->fraction > 0.0 && amount->fraction <= 1.0)) {
    fail<ValueError>(
        "budget '{}' in recipe '{}' is a ratio outside (0, 1]; expected a ratio in "
        "(0, 1] or a token count ≥ 1",
        value, recipe);
  }
  return Budget::ratio(amount->fraction);
}

// Runs a policy's constructor checks; their kvc::Error (a ValueError too: lowrank's rank,
// think's lambda) becomes a ValueError naming the recipe.
inline void validate_policy(const PolicyInfo& info, const RecipeArguments& args) {
  try {
    info.validate(args);
  } catch (const RecipeValueError&) {
    throw;
  } catch (const Error& error) {
    fail<ValueError>("recipe '{}': {}", args.recipe(), error.what());
  }
}

// `settings` restricted to the keys `parameters` declares, in declaration order, minus
// those equal to their default.
inline std::vector<RecipeSetting> canonical_settings(
    std::span<const RecipeParameter> parameters,
    const std::vector<std::pair<std::string_view, std::string>>& given) {
  std::vector<RecipeSetting> result;
  for (const RecipeParameter& parameter : parameters) {
    for (const auto& [key, value] : given) {
      if (key != parameter.key) continue;
      const auto default_value = canonical_value(parameter, parameter.default_value);
      if (!default_value || *default_value != value) {
        result.push_back({std::string(key), value});
      }
    }
  }
  return result;
}

// A recipe parsed against a registry: the spec, the table rows it names, and the budget
// it means (budget=, or what its parameters imply; nullopt: none).
struct ParsedRecipe {
  RecipeSpec spec;
  std::size_t scorer = 0;
  std::size_t planner = 0;
  std::size_t quantizer = 0;
  std::size_t scorer_settings = 0;  // spec.settings: the scorer's first, then the planner's
  bool evicts = false;
  std::optional<Budget> budget;
};

// A table row's fixed settings ("group=32"): trusted text, split on ',' and '='.
inline std::vector<std::pair<std::string_view, std::string_view>> fixed_settings(
    std::string_view fixed) {
  std::vector<std::pair<std::string_view, std::string_view>> settings;
  while (!fixed.empty()) {
    const std::string_view item = fixed.substr(0, fixed.find(','));
    const std::size_t equals = item.find('=');
    settings.emplace_back(item.substr(0, equals),
                          equals == std::string_view::npos ? "" : item.substr(equals + 1));
    fixed.remove_prefix(std::min(fixed.size(), item.size() + 1));
  }
  return settings;
}

// The quantizer part: among the rows under its name, the one whose fixed settings match
// (the first row's values are the defaults); then that row's own RecipeOptions.
template <class Infos>
void parse_quantizer(const RecipePart& part, const Infos& quantizers, std::string_view recipe,
                     ParsedRecipe& parsed) {
  RecipeSpec& spec = parsed.spec;
  std::vector<std::size_t> rows;
  for (std::size_t i = 0; i < quantizers.size(); ++i) {
    if (quantizers[i].name == part.name) rows.push_back(i);
  }
  if (rows.empty()) {
    fail<ValueError>("unknown quantizer '{}' in recipe '{}'; known: {}", part.name, recipe,
                     known_names(quantizers));
  }
  spec.quantizer = std::string(part.name);
  const auto defaults = fixed_settings(quantizers[rows[0]].fixed);
  auto wanted = defaults;
  for (auto& [key, value] : wanted) {
    for (const auto& [given_key, given_value] : part.settings) {
      if (given_key == key) value = given_value;
    }
  }
  // "group=0|32": what the selecting keys accept.
  std::string selecting;
  for (std::size_t k = 0; k < defaults.size(); ++k) {
    std::vector<std::string_view> values;
    for (const std::size_t row : rows) {
      const auto fixed = fixed_settings(quantizers[row].fixed);
      if (k < fixed.size()) values.push_back(fixed[k].second);
    }
    if (!selecting.empty()) selecting += ", ";
    selecting += fmt::format("{}={}", defaults[k].first,
                             join(values, "|", [](std::string_view v) { return std::string(v); }));
  }
  const auto row = std::find_if(rows.begin(), rows.end(), [&](std::size_t candidate) {
    return fixed_settings(quantizers[candidate].fixed) == wanted;
  });
  if (row == rows.end()) {
    fail<ValueError>(
        "no quantizer '{}' with {} in recipe '{}'; {} takes {}", part.name,
        join(wanted, ", ", [](const auto& s) { return fmt::format("{}={}", s.first, s.second); }),
        recipe, part.name, selecting);
  }
  parsed.quantizer = *row;
  const PolicyInfo& info = quantizers[*row];
  for (std::size_t k = 0; k < defaults.size(); ++k) {
    if (wanted[k].second != defaults[k].second) {
      spec.quantizer_settings.push_back(
          {std::string(wanted[k].first), std::string(wanted[k].second)});
    }
  }
  std::vector<std::pair<std::string_view, std::string>> given;
  for (const auto& setting : part.settings) {
    const auto& [key, value] = setting;
    const bool is_selecting = std::any_of(defaults.begin(), defaults.end(),
                                          [&](const auto& s) { return s.first == setting.first; });
    if (is_selecting) continue;
    const RecipeParameter* parameter = find_parameter(info.parameters, key);
    if (!parameter) {
      std::string keys = selecting;
      if (!info.parameters.empty()) {
        keys += (keys.empty() ? "" : ", ") + parameter_keys(info.parameters);
      }
      fail<ValueError>("unknown parameter '{}' for quantizer '{}' in recipe '{}'; {} takes {}", key,
                       part.name, recipe, part.name,
                       keys.empty() ? std::string("no parameters") : keys);
    }
    given.emplace_back(key, checked_value(*parameter, value, recipe));
  }
  const std::size_t selecting_count = spec.quantizer_settings.size();
  for (RecipeSetting& setting : canonical_settings(info.parameters, given)) {
    spec.quantizer_settings.push_back(std::move(setting));
  }
  validate_policy(
      info, RecipeArguments(
                recipe, info.name, info.parameters,
                std::span<const RecipeSetting>(spec.quantizer_settings).subspan(selecting_count)));
}

template <class Registry>
ParsedRecipe parse(std::string_view recipe, const Registry& registry) {
  const auto scorers = table_info(registry.scorers);
  const auto planners = table_info(registry.planners);
  const auto quantizers = table_info(registry.quantizers);
  static_assert(std::tuple_size_v<decltype(registry.planners)> >= 1 &&
                    std::tuple_size_v<decltype(registry.quantizers)> >= 1,
                "RecipeRegistry: the first planner and quantizer are the defaults");

  if (recipe.empty()) {
    fail<ValueError>("empty recipe; scorers: {}; quantizers: {}", known_names(scorers),
                     known_names(quantizers));
  }
  for (std::size_t i = 0; i < recipe.size(); ++i) {
    const auto c = static_cast<unsigned char>(recipe[i]);
    if (c <= ' ' || c == 0x7F) {
      fail<ValueError>(
          "recipe '{}' has whitespace or a control character at offset {}; recipes "
          "are written without spaces",
          recipe, i);
    }
  }
  const std::size_t plus = recipe.find('+');
  if (plus != std::string_view::npos && recipe.find('+', plus + 1) != std::string_view::npos) {
    fail<ValueError>(
        "recipe '{}' has more than one '+'; the form is "
        "<scorer>[:k=v,...][+<quantizer>[:k=v,...]]",
        recipe);
  }
  RecipePart scorer_part = split_part(recipe.substr(0, plus), recipe, "scorer");
  std::optional<RecipePart> quantizer_part;
  if (plus != std::string_view::npos) {
    quantizer_part = split_part(recipe.substr(plus + 1), recipe, "quantizer");
    if (quantizer_part->name.empty()) {
      fail<ValueError>("empty quantizer name after '+' in recipe '{}'; known: {}", recipe,
                       known_names(quantizers));
    }
  } else if (!find_name(scorers, scorer_part.name) && find_name(quantizers, scorer_part.name)) {
    quantizer_part = std::move(scorer_part);  // "int8": a quantizer alone
    scorer_part = RecipePart{};
  }
  if (scorer_part.name.empty()) scorer_part.name = std::get<0>(registry.scorers).name;

  ParsedRecipe parsed;
  RecipeSpec& spec = parsed.spec;

  // -- scorer, budget, planner
  const auto scorer = find_name(scorers, scorer_part.name);
  if (!scorer) {
    fail<ValueError>("unknown scorer '{}' in recipe '{}'; known: {}{}", scorer_part.name, recipe,
                     known_names(scorers),
                     plus == std::string_view::npos
                         ? fmt::format(" (or a quantizer alone: {})", known_names(quantizers))
                         : std::string());
  }
  const PolicyInfo& scorer_info = scorers[*scorer];
  parsed.scorer = *scorer;
  parsed.evicts = scorer_info.evicts;
  spec.scorer = scorer_info.name;
  spec.planner = planners[0].name;
  if (!scorer_info.planner.empty()) {
    const auto own = find_name(planners, scorer_info.planner);
    if (!own) {
      fail<ValueError>("scorer '{}' needs planner '{}', which this registry lacks (recipe '{}')",
                       scorer_info.name, scorer_info.planner, recipe);
    }
    parsed.planner = *own;
    spec.planner = planners[*own].name;
  }

  if (!scorer_info.evicts && !scorer_part.settings.empty()) {
    const std::string_view key = scorer_part.settings.front().first;
    fail<ValueError>(
        "unknown parameter '{}' for scorer '{}' in recipe '{}'; {} takes no "
        "parameters{}",
        key, scorer_info.name, recipe, scorer_info.name,
        key == "budget" || key == "planner"
            ? " (it keeps every token: pick an evicting scorer for a budget)"
            : "");
  }
  for (const auto& [key, value] : scorer_part.settings) {
    if (key != "planner") continue;
    const auto planner = find_name(planners, value);
    if (!planner) {
      fail<ValueError>("unknown planner '{}' in recipe '{}'; known: {}", value, recipe,
                       known_names(planners));
    }
    if (!scorer_info.planner.empty() && value != scorer_info.planner) {
      fail<ValueError>("scorer '{}' always uses planner '{}'; drop planner={} from recipe '{}'",
                       scorer_info.name, scorer_info.planner, value, recipe);
    }
    parsed.planner = *planner;
    spec.planner = planners[*planner].name;
  }
  const PolicyInfo& planner_info = planners[parsed.planner];

  std::vector<std::pair<std::string_view, std::string>> given;
  for (const auto& [key, value] : scorer_part.settings) {
    if (key == "planner") continue;
    if (key == "budget") {
      spec.budget = checked_budget(value, recipe);
      continue;
    }
    const RecipeParameter* parameter = find_parameter(scorer_info.parameters, key);
    if (!parameter) parameter = find_parameter(planner_info.parameters, key);
    if (!parameter) {
      for (const PolicyInfo& other : planners) {
        if (find_parameter(other.parameters, key)) {
          fail<ValueError>("parameter '{}' in recipe '{}' belongs to planner '{}'; add planner={}",
                           key, recipe, other.name, other.name);
        }
      }
      std::string keys = "budget, planner";
      if (!scorer_info.parameters.empty()) keys += ", " + parameter_keys(scorer_info.parameters);
      if (!planner_info.parameters.empty()) keys += ", " + parameter_keys(planner_info.parameters);
      fail<ValueError>("unknown parameter '{}' for scorer '{}' in recipe '{}'; {} takes: {}", key,
                       scorer_info.name, recipe, scorer_info.name, keys);
    }
    given.emplace_back(key, checked_value(*parameter, value, recipe));
  }
  spec.settings = canonical_settings(scorer_info.parameters, given);
  const std::size_t scorer_settings = spec.settings.size();
  parsed.scorer_settings = scorer_settings;
  for (RecipeSetting& setting : canonical_settings(planner_info.parameters, given)) {
    spec.settings.push_back(std::move(setting));
  }
  const std::span<const RecipeSetting> all_settings(spec.settings);
  const RecipeArguments scorer_args(recipe, scorer_info.name, scorer_info.parameters,
                                    all_settings.first(scorer_settings));
  const RecipeArguments planner_args(recipe, planner_info.name, planner_info.parameters,
                                     all_settings.subspan(scorer_settings));
  validate_policy(scorer_info, scorer_args);
  validate_policy(planner_info, planner_args);
  try {
    parsed.budget = scorer_info.budget(scorer_args, spec.budget);
  } catch (const RecipeValueError&) {
    throw;
  } catch (const Error& error) {
    fail<ValueError>("recipe '{}': {}", recipe, error.what());
  }

  // -- quantizer: among the rows under its name, the one whose fixed settings match
  if (!quantizer_part) {
    spec.quantizer = quantizers[0].name;
    return parsed;
  }
  parse_quantizer(*quantizer_part, quantizers, recipe, parsed);
  return parsed;
}

}  // namespace detail

// ---- the API -----------------------------------------------------------------------------

namespace detail {

// visitor(entry) for the row-th entry of a table; Result{} if there is none.
template <class Result, class Table, class Visitor>
Result visit_row(const Table& table, std::size_t row, Visitor&& visitor) {
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    Result result{};
    ((I == row ? (void)(result = visitor(std::get<I>(table))) : void()), ...);
    return result;
  }
  (std::make_index_sequence<std::tuple_size_v<Table>>{});
}

template <class Entry>
using entry_policy = typename std::remove_cvref_t<Entry>::policy_type;

template <class... Entries>
struct RecipePlannerOf<std::tuple<Entries...>> {
  using type = RecipePlanner<entry_policy<Entries>...>;
};

template <class Table>
using first_policy = entry_policy<std::tuple_element_t<0, Table>>;

// What build_row needs to build the cache a parsed recipe names, whatever the row: the
// arguments of each role (their names and parameters already looked up in the registry's
// tables) and the options. Not a template, so that the explicit instantiations of
// build_row (KVC_INSTANTIATE_DEFAULT_RECIPE_ROW) take it as it is.
struct BuildRequest {
  const ParsedRecipe& parsed;
  RecipeArguments scorer_args;
  RecipeArguments planner_args;
  // Holds the selecting settings too ("group=32"), which the quantizer does not declare.
  RecipeArguments quantizer_args;
  std::string text;  // the canonical recipe: the cache's recipe()
  Geometry geometry;
  CacheOptions options;
};

// The caches of ONE quantizer row: dispatches the scorer, one KvCache per scorer. The
// planner is chosen at run time inside RecipePlanner; a scorer that never evicts gets the
// default planner. Not inline: a TU that sees `extern template` for a row (the default
// registry's, KVC_EXTERN_DEFAULT_RECIPES) instantiates nothing of it.
template <class Registry, std::size_t Row>
std::unique_ptr<AnyCache> build_row(const Registry& registry, BuildRequest& request) {
  using Planners = decltype(registry.planners);
  using Quant = entry_policy<std::tuple_element_t<Row, decltype(registry.quantizers)>>;
  using Result = std::unique_ptr<AnyCache>;
  const ParsedRecipe& parsed = request.parsed;
  return visit_row<Result>(registry.scorers, parsed.scorer, [&](const auto& scorer) -> Result {
    using Scorer = entry_policy<decltype(scorer)>;
    Scorer scorer_policy = RecipeOptions<Scorer>::make(request.scorer_args);
    Quant quant_policy = RecipeOptions<Quant>::make(request.quantizer_args);
    if constexpr (!Scorer::evicts) {
      using Planner = first_policy<Planners>;
      using Cache = KvCache<Scorer, Quant, retrieval::Exhaustive, offload::None, Planner>;
      return std::make_unique<CacheModel<Cache>>(
          std::move(request.text), request.geometry, request.options, std::move(scorer_policy),
          std::move(quant_policy), retrieval::Exhaustive{}, offload::None{},
          RecipeOptions<Planner>::make(request.planner_args));
    } else {
      using Planner = typename RecipePlannerOf<Planners>::type;
      using Cache = KvCache<Scorer, Quant, retrieval::Exhaustive, offload::None, Planner>;
      auto planner = visit_row<std::optional<Planner>>(
          registry.planners, parsed.planner, [&](const auto& entry) {
            using Chosen = entry_policy<decltype(entry)>;
            if constexpr (MakesPlanner<Scorer, Chosen>) {
              return std::optional<Planner>(
                  Planner(RecipeOptions<Scorer>::make_planner(request.scorer_args)));
            } else {
              return std::optional<Planner>(
                  Planner(RecipeOptions<Chosen>::make(request.planner_args)));
            }
          });
      return std::make_unique<CacheModel<Cache>>(
          std::move(request.text), request.geometry, request.options, std::move(scorer_policy),
          std::move(quant_policy), retrieval::Exhaustive{}, offload::None{}, *std::move(planner));
    }
  });
}

// Quantizer first (the row, at run time), then scorer (in build_row): one KvCache per
// (quantizer, scorer).
template <class Registry>
std::unique_ptr<AnyCache> build(const Registry& registry, const ParsedRecipe& parsed,
                                std::string_view recipe, std::string text, Geometry geometry,
                                CacheOptions options) {
  const auto scorers = table_info(registry.scorers);
  const auto planners = table_info(registry.planners);
  const auto quantizers = table_info(registry.quantizers);
  const std::span<const RecipeSetting> settings(parsed.spec.settings);
  BuildRequest request{
      parsed,
      RecipeArguments(recipe, scorers[parsed.scorer].name, scorers[parsed.scorer].parameters,
                      settings.first(parsed.scorer_settings)),
      RecipeArguments(recipe, planners[parsed.planner].name, planners[parsed.planner].parameters,
                      settings.subspan(parsed.scorer_settings)),
      RecipeArguments(recipe, quantizers[parsed.quantizer].name,
                      quantizers[parsed.quantizer].parameters, parsed.spec.quantizer_settings),
      std::move(text),
      geometry,
      options};
  using Result = std::unique_ptr<AnyCache>;
  return [&]<std::size_t... Row>(std::index_sequence<Row...>) {
    Result result{};
    ((Row == parsed.quantizer ? (void)(result = build_row<Registry, Row>(registry, request))
                              : void()),
     ...);
    return result;
  }
  (std::make_index_sequence<std::tuple_size_v<decltype(registry.quantizers)>>{});
}

inline RecipeInfo::Parameter parameter_info(const RecipeParameter& parameter) {
  return {std::string(parameter.key), parameter.kind, std::string(parameter.default_value),
          std::string(parameter.description), std::string(parameter.choices)};
}

}  // namespace detail

// ---- the default registry, compiled once (opt-in; "Compile time" at the top) -------------
// KVC_EXTERN_DEFAULT_RECIPES declares, and KVC_INSTANTIATE_DEFAULT_RECIPE_ROW(n) defines, the
// explicit instantiation of build_row for row n of recipe_quantizers. The rows are listed by
// hand (an explicit instantiation cannot be generated): when recipe_quantizers gains or loses
// an entry, update both macros below (the static_assert after them checks).
#define KVC_DEFAULT_RECIPE_ROW_COUNT 14
#define KVC_DETAIL_DEFAULT_RECIPE_ROWS(X) \
  X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13)

// Explicit instantiation (definition) of row N of the default registry; at namespace scope.
#define KVC_INSTANTIATE_DEFAULT_RECIPE_ROW(N)                                                 \
  template std::unique_ptr<::kvc::AnyCache> kvc::detail::build_row<::kvc::DefaultRecipes, N>( \
      const ::kvc::DefaultRecipes&, ::kvc::detail::BuildRequest&)
#define KVC_DETAIL_INSTANTIATE_ROW(N) KVC_INSTANTIATE_DEFAULT_RECIPE_ROW(N);
// Every row, in one TU.
#define KVC_INSTANTIATE_DEFAULT_RECIPES \
  KVC_DETAIL_DEFAULT_RECIPE_ROWS(KVC_DETAIL_INSTANTIATE_ROW) static_assert(true)

namespace detail {
#define KVC_DETAIL_LIST_ROW(N) N,
inline constexpr std::size_t default_recipe_rows[] = {
    KVC_DETAIL_DEFAULT_RECIPE_ROWS(KVC_DETAIL_LIST_ROW)};
#undef KVC_DETAIL_LIST_ROW
constexpr bool default_recipe_rows_listed() {
  for (std::size_t i = 0; i < std::size(default_recipe_rows); ++i) {
    if (default_recipe_rows[i] != i) return false;
  }
  return true;
}
static_assert(std::tuple_size_v<decltype(recipe_quantizers)> == KVC_DEFAULT_RECIPE_ROW_COUNT &&
                  std::size(default_recipe_rows) == KVC_DEFAULT_RECIPE_ROW_COUNT &&
                  default_recipe_rows_listed(),
              "kvc: recipe_quantizers changed size: set KVC_DEFAULT_RECIPE_ROW_COUNT to its size "
              "and list every row 0 .. size - 1 in KVC_DETAIL_DEFAULT_RECIPE_ROWS "
              "(kvc/runtime/recipe.hpp)");

#ifdef KVC_EXTERN_DEFAULT_RECIPES
#define KVC_DETAIL_EXTERN_ROW(N)                                                                \
  extern template std::unique_ptr<AnyCache> build_row<DefaultRecipes, N>(const DefaultRecipes&, \
                                                                         BuildRequest&);
KVC_DETAIL_DEFAULT_RECIPE_ROWS(KVC_DETAIL_EXTERN_ROW)
#undef KVC_DETAIL_EXTERN_ROW
#endif
}  // namespace detail

// Parses and checks a recipe without building anything (ValueError on a bad one). An
// evicting scorer without `budget=` parses: make_cache then takes CacheOptions::budget.
template <class Registry = DefaultRecipes>
RecipeSpec parse_recipe(std::string_view recipe, const Registry& registry = default_recipes) {
  return detail::parse(recipe, registry).spec;
}

// Builds the cache a recipe names. `base` supplies the options a recipe does not set
// (page_tokens, auto_compress, check_finite, eviction_slack) and the budget when the recipe
// has none; the recipe's budget overrides base.budget; a scorer that keeps every token
// (full) gets Budget::unlimited() whatever base says. The cache's recipe() is the canonical
// recipe, with the budget it got from `base` written in.
template <class Registry = DefaultRecipes>
std::unique_ptr<AnyCache> make_cache(std::string_view recipe, Geometry geometry,
                                     CacheOptions base = {},
                                     const Registry& registry = default_recipes) {
  const detail::ParsedRecipe parsed = detail::parse(recipe, registry);
  RecipeSpec spec = parsed.spec;
  CacheOptions options = base;
  if (!parsed.evicts) {
    options.budget = Budget::unlimited();
  } else if (parsed.budget) {
    options.budget = *parsed.budget;
  } else if (!base.budget.is_unlimited()) {
    spec.budget = base.budget;
  } else {
    detail::fail<ValueError>(
        "recipe '{}' sets no budget and CacheOptions::budget is unlimited, but scorer '{}' evicts; "
        "add budget=<tokens> or budget=<ratio>, e.g. '{}:budget=0.25'",
        recipe, spec.scorer, spec.scorer);
  }
  return detail::build(registry, parsed, recipe, spec.to_string(), geometry, options);
}

// Every scorer, planner and quantizer a recipe can name, with its parameters, their
// defaults, a one-line summary and an example recipe that builds it.
template <class Registry = DefaultRecipes>
std::vector<RecipeInfo> recipe_catalog(const Registry& registry = default_recipes) {
  const auto scorers = detail::table_info(registry.scorers);
  const auto planners = detail::table_info(registry.planners);
  const auto quantizers = detail::table_info(registry.quantizers);
  std::string_view evicting;  // the first evicting scorer: planners' examples use it
  for (const detail::PolicyInfo& scorer : scorers) {
    if (scorer.evicts && evicting.empty()) evicting = scorer.name;
  }
  std::vector<RecipeInfo> catalog;
  for (const detail::PolicyInfo& scorer : scorers) {
    RecipeInfo info{RecipeInfo::Role::scorer,
                    std::string(scorer.name),
                    std::string(scorer.summary),
                    {},
                    std::string(scorer.name)};
    if (scorer.evicts) {
      info.parameters.push_back(
          {"budget", RecipeValue::amount, "",
           "tokens kept per (layer, kv head): a count, or a ratio of the tokens seen in (0, 1]; "
           "required unless CacheOptions::budget is set",
           ""});
      if (!scorer.planner.empty()) {
        info.parameters.push_back({"planner", RecipeValue::choice, std::string(scorer.planner),
                                   "this scorer's own planner (the only choice)",
                                   std::string(scorer.planner)});
      } else {
        info.parameters.push_back({"planner", RecipeValue::choice, std::string(planners[0].name),
                                   "how the budget splits across layers",
                                   detail::join(planners, "|", [](const detail::PolicyInfo& p) {
                                     return std::string(p.name);
                                   })});
      }
      info.example += ":budget=0.5";
    }
    for (const RecipeParameter& parameter : scorer.parameters) {
      info.parameters.push_back(detail::parameter_info(parameter));
    }
    catalog.push_back(std::move(info));
  }
  for (std::size_t row = 0; row < planners.size(); ++row) {
    const detail::PolicyInfo& planner = planners[row];
    RecipeInfo info{
        RecipeInfo::Role::planner,
        std::string(planner.name),
        std::string(planner.summary),
        {},
        fmt::format("{}:budget=0.5{}", evicting,
                    row == 0 ? std::string() : fmt::format(",planner={}", planner.name))};
    for (const RecipeParameter& parameter : planner.parameters) {
      info.parameters.push_back(detail::parameter_info(parameter));
    }
    catalog.push_back(std::move(info));
  }
  for (std::size_t row = 0; row < quantizers.size(); ++row) {
    const detail::PolicyInfo& quantizer = quantizers[row];
    RecipeInfo info{RecipeInfo::Role::quantizer,
                    std::string(quantizer.name),
                    std::string(quantizer.summary),
                    {},
                    std::string(quantizer.name)};
    const std::size_t first = *detail::find_name(quantizers, quantizer.name);  // the defaults
    const auto defaults = detail::fixed_settings(quantizers[first].fixed);
    const auto fixed = detail::fixed_settings(quantizer.fixed);
    std::vector<std::string> differing;
    for (std::size_t k = 0; k < defaults.size(); ++k) {
      std::string choices;
      for (const detail::PolicyInfo& other : quantizers) {
        if (other.name != quantizer.name) continue;
        const auto values = detail::fixed_settings(other.fixed);
        if (k >= values.size()) continue;
        choices += (choices.empty() ? "" : "|") + std::string(values[k].second);
      }
      info.parameters.push_back({std::string(defaults[k].first), RecipeValue::choice,
                                 std::string(defaults[k].second), "selects the format", choices});
      if (k < fixed.size() && fixed[k].second != defaults[k].second) {
        differing.push_back(fmt::format("{}={}", fixed[k].first, fixed[k].second));
      }
    }
    if (!differing.empty()) {
      info.example += ':' + detail::join(differing, ",", [](const std::string& s) { return s; });
    }
    for (const RecipeParameter& parameter : quantizer.parameters) {
      info.parameters.push_back(detail::parameter_info(parameter));
    }
    catalog.push_back(std::move(info));
  }
  return catalog;
}

}  // namespace kvc
