// bench/machine.hpp — what the benchmark reports say about the machine they ran on.
#pragma once

#include <kvc/kvc.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <fstream>
#include <string>

namespace kvc::bench {

// "model name" from /proc/cpuinfo (Linux); Google Benchmark's context has no CPU model.
inline std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const std::size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown";
}

// A Google Benchmark binary's main: records the machine, the SIMD arch, kvc's version, the
// compiler, the page size and the run's `shape` in the JSON context, then runs.
inline int run_benchmarks(int argc, char** argv, const std::string& shape) {
  benchmark::AddCustomContext("cpu", cpu_model());
  benchmark::AddCustomContext("simd_arch", std::string(kvc::simd::arch_name()));
  benchmark::AddCustomContext("kvc_version", fmt::format("{}.{}.{}", kvc::version_major,
                                                         kvc::version_minor, kvc::version_patch));
  benchmark::AddCustomContext("compiler", fmt::format("{} {}",
#if defined(__clang__)
                                                      "clang",
#else
                                                      "gcc",
#endif
                                                      __VERSION__));
  benchmark::AddCustomContext("page_tokens", std::to_string(kvc::CacheOptions{}.page_tokens));
  benchmark::AddCustomContext("shape", shape);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace kvc::bench
