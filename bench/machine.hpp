// bench/machine.hpp — what the benchmark reports say about the machine they ran on.
#pragma once

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

}  // namespace kvc::bench
