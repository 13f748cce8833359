// kvc-eval — every recipe × budget on a real model: perplexity and its delta vs. the full
// cache, attention-output error, passkey accuracy by depth and length, a shared-context
// multi-query score, bytes per token, compression ratio and decode ms/token.
//
//   kvc-eval [--model DIR] [--text FILE] [--recipe R]... [--budgets 0.5,0.25,0.125]
//            [--quick] [--out DIR] [--check]
//
// --text: the perplexity text and passkey filler (default MODEL/heldout.txt); a `.ids` file
// holds token ids (tokenize_ids.py) for a model with its own tokenizer — the passkey and
// lookup prompts are spelled in bytes, so only the byte-level model reads them as text.
// Without --recipe it evaluates `full`, every evicting scorer of kvc::recipe_catalog() at
// every budget (as `<scorer>:budget=<b>`), the PyramidKV, AdaKV, CAKE and PrefixKV planners
// at the middle budget, every quantizer alone and
// SnapKV composed with each quantizer. Writes DIR/eval.json and DIR/eval.md; `bench/report
// eval DIR/eval.json` draws the PNG plots (perplexity vs. bytes, the needle heat-map).
// --check turns the invariants into the exit status (CI runs `kvc-eval --quick --check`):
// the full cache retrieves passkeys at ≥ 95 %, `full` through the registry reproduces the
// plain KvCache<> exactly (perplexity delta 0, attention error 0), and for every scorer the
// bytes held shrink as its budget shrinks.
#include <tinyllm/eval.hpp>
#include <tinyllm/model.hpp>

#include <kvc/runtime/recipe.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using tinyllm::eval::Report;

struct Arguments {
  fs::path model = TINYLLM_DEFAULT_MODEL;
  fs::path text;  // default: MODEL/heldout.txt
  std::vector<std::string> recipes;
  std::vector<double> budgets{0.5, 0.25, 0.125};
  bool quick = false, check = false;
  fs::path out = "kvc-eval-results";
};

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "kvc-eval: %s\nusage: kvc-eval [--model DIR] [--recipe R]... "
               "[--budgets 0.5,0.25] [--quick] [--out DIR] [--check]\n",
               problem.c_str());
  std::exit(2);
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--model") {
      args.model = value();
    } else if (arg == "--text") {
      args.text = value();
    } else if (arg == "--recipe") {
      args.recipes.push_back(value());
    } else if (arg == "--budgets") {
      args.budgets.clear();
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) {
        try {
          args.budgets.push_back(std::stod(item));
        } catch (const std::exception&) {
          usage("bad budget '" + item + "'");
        }
        if (!(args.budgets.back() > 0.0 && args.budgets.back() < 1.0)) {
          usage("budget " + item + " is not a ratio in (0, 1)");
        }
      }
    } else if (arg == "--quick") {
      args.quick = true;
    } else if (arg == "--check") {
      args.check = true;
    } else if (arg == "--out") {
      args.out = value();
    } else if (arg == "--help" || arg == "-h") {
      usage("help");
    } else {
      usage("unknown argument '" + arg + "'");
    }
  }
  return args;
}

std::string budget_text(double budget) {
  return fmt::format("{:g}", budget);
}

// Every recipe the catalog knows, at every budget.
std::vector<std::string> default_recipes(const std::vector<double>& budgets) {
  std::vector<std::string> recipes{"full"};
  const auto catalog = kvc::recipe_catalog();
  std::vector<std::string> scorers, quantizers;
  for (const auto& info : catalog) {
    const bool has_budget = std::any_of(info.parameters.begin(), info.parameters.end(),
                                        [](const auto& p) { return p.key == "budget"; });
    if (info.role == kvc::RecipeInfo::Role::scorer && has_budget) scorers.push_back(info.name);
    if (info.role == kvc::RecipeInfo::Role::quantizer && info.name != "f32" &&
        std::find(quantizers.begin(), quantizers.end(), info.name) == quantizers.end()) {
      quantizers.push_back(info.name);  // int8 is listed once per group setting
    }
  }
  for (const auto& scorer : scorers) {
    for (double b : budgets) recipes.push_back(scorer + ":budget=" + budget_text(b));
  }
  const std::string mid = budget_text(budgets[budgets.size() / 2]);
  recipes.push_back("h2o:budget=" + mid + ",planner=pyramid");
  recipes.push_back("snapkv:budget=" + mid + ",planner=adakv");
  recipes.push_back("cake:budget=" + mid + ",planner=cake");
  recipes.push_back("snapkv:budget=" + mid + ",planner=prefixkv");
  for (const auto& quant : quantizers) recipes.push_back(quant);
  for (const auto& quant : quantizers) recipes.push_back("snapkv:budget=" + mid + "+" + quant);
  return recipes;
}

nlohmann::json to_json(const Report& r) {
  return {{"recipe", r.recipe},
          {"perplexity", r.perplexity},
          {"perplexity_delta", r.perplexity_delta},
          {"attention_error", r.attention_error},
          {"passkey_accuracy", r.passkey_accuracy},
          {"passkey_grid", r.passkey_grid},
          {"passkey_second_accuracy", r.passkey_second_accuracy},
          {"multi_query", r.multi_query},
          {"tokens_seen", r.tokens_seen},
          {"tokens_stored", r.tokens_stored},
          {"bytes_held", r.bytes_held},
          {"bytes_per_token", r.bytes_per_token()},
          {"compression_ratio", r.compression_ratio()},
          {"decode_ms_per_token", r.decode_ms_per_token}};
}

std::string markdown(const std::vector<Report>& reports) {
  std::string md =
      "| recipe | bytes/token | ratio vs f16 | ppl | Δppl | attn err | passkey | passkey, 2nd "
      "query | lookups (q1..qN) | ms/token |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---:|\n";
  for (const auto& r : reports) {
    std::string mq;
    for (double a : r.multi_query) mq += fmt::format("{}{:.0f}", mq.empty() ? "" : "/", 100 * a);
    md += fmt::format(
        "| `{}` | {:.0f} | {:.2f}× | {:.3f} | {:+.3f} | {:.3f} | {:.0f} % | {:.0f} % | {} % | "
        "{:.2f} |\n",
        r.recipe, r.bytes_per_token(), r.compression_ratio(), r.perplexity, r.perplexity_delta,
        r.attention_error, 100 * r.passkey_accuracy, 100 * r.passkey_second_accuracy, mq,
        r.decode_ms_per_token);
  }
  return md;
}

// A recipe's family (its canonical form without the budget: "h2o:budget=0.25+int8" →
// "h2o+int8") and its budget (a ratio or tokens; unlimited = the largest), so the
// bytes-shrink check compares a recipe only with its own budgets.
std::pair<std::string, double> family_and_budget(const std::string& recipe) {
  kvc::RecipeSpec spec = kvc::parse_recipe(recipe);
  const std::optional<kvc::Budget> budget = std::exchange(spec.budget, std::nullopt);
  if (!budget || budget->is_unlimited()) return {spec.to_string(), HUGE_VAL};
  return {spec.to_string(), budget->kind() == kvc::Budget::Kind::ratio
                                ? budget->fraction()
                                : static_cast<double>(budget->token_count())};
}

int run(const Arguments& args) {
  const auto model = tinyllm::Model::load(args.model);
  const auto heldout =
      tinyllm::eval::read_tokens(args.text.empty() ? args.model / "heldout.txt" : args.text);
  const auto settings = args.quick ? tinyllm::eval::Settings::quick() : tinyllm::eval::Settings{};
  const auto recipes = args.recipes.empty() ? default_recipes(args.budgets) : args.recipes;
  const kvc::Geometry geometry = model.geometry();
  using Plain = kvc::CacheModel<kvc::KvCache<>>;
  auto make_plain = [&]() -> std::unique_ptr<kvc::AnyCache> {
    return std::make_unique<Plain>("", geometry);
  };
  // The baseline is a plain KvCache<>, built without the registry.
  const double baseline = tinyllm::eval::perplexity(model, *make_plain(), heldout,
                                                    settings.ppl_prompt, settings.ppl_decode)
                              .perplexity;

  const bool tty = isatty(fileno(stderr)) != 0;
  std::vector<Report> reports;
  for (std::size_t i = 0; i < recipes.size(); ++i) {
    const auto& recipe = recipes[i];
    auto make = [&]() { return kvc::make_cache(recipe, geometry); };
    auto progress = [&](std::string_view what, std::size_t done, std::size_t total) {
      if (!tty) return;
      std::fprintf(stderr, "\r\033[K[%zu/%zu] %-40s %-16.*s %zu/%zu", i + 1, recipes.size(),
                   recipe.c_str(), static_cast<int>(what.size()), what.data(), done, total);
    };
    make();  // a bad recipe fails here, before any work
    reports.push_back(tinyllm::eval::evaluate(model, recipe, make, make_plain, heldout, settings,
                                              baseline, progress));
    const auto& r = reports.back();
    std::fprintf(stderr, "%s[%zu/%zu] %-40s ppl %.3f (%+.3f)  passkey %3.0f %%  %6.0f B/token\n",
                 tty ? "\r\033[K" : "", i + 1, recipes.size(), recipe.c_str(), r.perplexity,
                 r.perplexity_delta, 100 * r.passkey_accuracy, r.bytes_per_token());
  }

  nlohmann::json json;
  json["benchmark"] = "eval";
  json["model"] = args.model.string();
  json["quick"] = args.quick;
  json["geometry"] = {{"layers", geometry.layers},
                      {"q_heads", geometry.q_heads},
                      {"kv_heads", geometry.kv_heads},
                      {"head_dim", geometry.head_dim}};
  json["settings"] = {
      {"ppl_prompt", settings.ppl_prompt},           {"ppl_decode", settings.ppl_decode},
      {"passkey_lengths", settings.passkey_lengths}, {"passkey_depths", settings.passkey_depths},
      {"passkey_trials", settings.passkey_trials},   {"lookup_length", settings.lookup_length},
      {"lookup_queries", settings.lookup_queries},   {"lookup_trials", settings.lookup_trials}};
  json["baseline_perplexity"] = baseline;
  for (const auto& r : reports) json["recipes"].push_back(to_json(r));
  fs::create_directories(args.out);
  std::ofstream(args.out / "eval.json") << json.dump(1) << "\n";
  const std::string md =
      fmt::format("# kvc-eval: {}{}\n\n", args.model.filename().string(),
                  args.quick ? " (--quick)" : "") +
      fmt::format(
          "{} layers, {} query / {} kv heads, head_dim {}. Baseline (plain KvCache<>) "
          "perplexity {:.3f} on {} prompt + {} teacher-forced tokens. Passkey: lengths "
          "{}, depths {}, {} trials each; asked 2nd: after {} bytes of other prose. "
          "Lookups: {} queries over a {}-byte context, {} trials. Budgets are shares of "
          "the tokens seen; bytes/token = bytes held ÷ tokens seen (all layers, kv "
          "heads; pages + metadata).\n\n",
          geometry.layers, geometry.q_heads, geometry.kv_heads, geometry.head_dim, baseline,
          settings.ppl_prompt, settings.ppl_decode, fmt::join(settings.passkey_lengths, "/"),
          fmt::join(settings.passkey_depths, "/"), settings.passkey_trials, settings.other_query,
          settings.lookup_queries, settings.lookup_length, settings.lookup_trials) +
      markdown(reports);
  std::ofstream(args.out / "eval.md") << md;
  std::printf("%s\nwrote %s and %s\n", md.c_str(), (args.out / "eval.json").c_str(),
              (args.out / "eval.md").c_str());

  if (!args.check) return 0;
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      std::fprintf(stderr, "check failed: %s\n", what.c_str());
      ++failures;
    }
  };
  std::map<std::string, std::vector<std::pair<double, std::size_t>>> families;
  for (const auto& r : reports) {
    if (r.recipe == "full") {
      expect(r.passkey_accuracy >= 0.95,
             fmt::format("full passkey accuracy {:.3f} < 0.95", r.passkey_accuracy));
      expect(r.passkey_second_accuracy >= 0.95,
             fmt::format("full passkey (asked 2nd) accuracy {:.3f} < 0.95",
                         r.passkey_second_accuracy));
      expect(r.perplexity_delta == 0.0,
             fmt::format("full perplexity delta {} != 0", r.perplexity_delta));
      expect(r.attention_error == 0.0,
             fmt::format("full attention error {} != 0", r.attention_error));
    }
    const auto [family, budget] = family_and_budget(r.recipe);
    families[family].emplace_back(budget, r.bytes_held);
  }
  for (auto& [family, points] : families) {
    std::sort(points.begin(), points.end());
    for (std::size_t i = 1; i < points.size(); ++i) {
      expect(points[i - 1].second < points[i].second,
             fmt::format("{}: budget {} holds {} B, not less than budget {} with {} B", family,
                         points[i - 1].first, points[i - 1].second, points[i].first,
                         points[i].second));
    }
  }
  std::fprintf(stderr, "%s\n", failures ? "checks FAILED" : "checks passed");
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvc-eval: %s\n", e.what());
    return 1;
  }
}
