// Tests of kvc/retrieval/exhaustive.hpp: it reads everything (attend takes the all-pages
// path; tests/core/kv_cache.cpp checks that path against the float64 reference).
#include <kvc/retrieval/exhaustive.hpp>

#include <kvc/core/concepts.hpp>

#include <catch2/catch.hpp>

TEST_CASE("Exhaustive declares full coverage and keeps no state", "[retrieval]") {
  STATIC_REQUIRE(kvc::retrieval::Exhaustive::reads_all);
  STATIC_REQUIRE(std::is_empty_v<kvc::retrieval::Exhaustive::HeadState>);
  STATIC_REQUIRE(kvc::RetrievalIndex<kvc::retrieval::Exhaustive>);
  CHECK(kvc::retrieval::Exhaustive::name() == "exhaustive");
}
